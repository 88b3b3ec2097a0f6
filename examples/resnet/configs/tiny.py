"""A seconds-long run on the bundled digits."""

from resnet.configs import default


def get_config() -> default.Config:
  return default.get_config().replace(
    data=None,
    val_size=200,
    flip=False,
    width=4,
    stage_sizes=(1, 1, 1, 1),
    batch_size=64,
    epochs=2.0,
    evals_per_epoch=2,
  )
