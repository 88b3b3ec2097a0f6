"""A seconds-long run on the bundled digits (`compare.py`'s default)."""

import ml_collections

from convnet.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data = None
  config.val_size = 200
  config.flip = False
  config.widths = (8, 16, 32)
  config.batch_size = 64
  config.epochs = 4.0
  config.evals_per_epoch = 2
  return config
