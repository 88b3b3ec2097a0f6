"""A seconds-long run on the bundled digits (`compare.py`'s default)."""

from convnet.configs import default


def get_config() -> default.Config:
  return default.get_config().replace(
    data=None,
    val_size=200,
    flip=False,
    widths=(8, 16, 32),
    batch_size=64,
    epochs=4.0,
    evals_per_epoch=2,
  )
