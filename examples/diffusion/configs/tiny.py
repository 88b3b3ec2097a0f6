"""A seconds-long run on the bundled digits (`compare.py`'s default)."""

import ml_collections

from diffusion.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data = None
  config.val_size = 200
  config.flip = False
  config.widths = (8, 16)
  config.heads = 2
  config.batch_size = 32
  config.steps = 40
  config.eval_every = 20
  config.eval_size = 200
  config.eval_batch_size = 200
  config.samples = 16
  config.sample_steps = 10
  return config
