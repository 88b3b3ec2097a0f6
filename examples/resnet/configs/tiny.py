"""A seconds-long run on the bundled digits."""

import ml_collections

from resnet.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data = None
  config.val_size = 200
  config.flip = False
  config.width = 4
  config.stage_sizes = (1, 1, 1, 1)
  config.batch_size = 64
  config.epochs = 2.0
  config.evals_per_epoch = 2
  return config
