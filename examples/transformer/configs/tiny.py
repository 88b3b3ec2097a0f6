"""A seconds-long run on the embedded corpus (Python stdlib sources)."""

import ml_collections

from transformer.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data = None
  config.max_bytes = 500_000
  config.d_model = 64
  config.num_layers = 1
  config.num_heads = 2
  config.context = 32
  config.batch_size = 16
  config.steps = 100
  config.eval_every = 20
  config.eval_windows = 128
  return config
