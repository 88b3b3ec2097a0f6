"""A seconds-long run on the bundled digits (`compare.py`'s default)."""

from diffusion.configs import default


def get_config() -> default.Config:
  return default.get_config().replace(
    data=None,
    val_size=200,
    flip=False,
    widths=(8, 16),
    heads=2,
    batch_size=32,
    steps=40,
    eval_every=20,
    eval_size=200,
    eval_batch_size=200,
    samples=16,
    sample_steps=10,
  )
