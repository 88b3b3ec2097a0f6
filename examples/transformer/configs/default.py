"""Default hyperparameters: the byte-level Transformer (1.4M parameters).

`--config.FIELD=VALUE` sets any field below (absl flags,
`ml_collections.config_flags`).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """3 blocks of width 192, 6 heads, context 64: 1.44M parameters; 2,000
  steps of 32 windows (about 4 passes over tinyshakespeare's training
  split)."""
  config = ml_collections.ConfigDict()
  # A text file (e.g. tinyshakespeare's `input.txt`); None: Python's standard-
  # library sources (no download), capped at `max_bytes`.
  config.data = config_dict.placeholder(str)
  # Size cap of the embedded corpus.
  config.max_bytes = 2_000_000
  # Model width.
  config.d_model = 192
  # Transformer blocks.
  config.num_layers = 3
  # Attention heads.
  config.num_heads = 6
  # Tokens per training window.
  config.context = 64
  # `muon`, `adamw`, `nadamw`, `sgd` or `optax_muon`.
  config.optimizer = 'muon'
  # More keyword arguments of the optimizer, e.g. `{'beta': 0.9}` for `muon`:
  # set in a config file or by compare.py's `--variant` (flags cannot add
  # keys).
  config.optimizer_kwargs = ml_collections.ConfigDict()
  # `muon` and `normuon` only: fnmatch patterns naming the output head, which
  # goes to the Adam part (`muon_optax.route`'s `head_names`); None: the
  # library's; empty (`--config.head_names=()`): the head goes to Muon.
  config.head_names = config_dict.placeholder(tuple)
  # Peak learning rate.
  config.learning_rate = 0.02
  # Linear warm-up over this fraction of the steps, then linear decay to 0.
  config.warmup_fraction = 0.1
  # Windows per step.
  config.batch_size = 32
  # Training steps.
  config.steps = 2000
  # Initialization and batching seed.
  config.seed = 0
  # Steps between validation points.
  config.eval_every = 100
  # Validation (and test) windows: non-overlapping, from the start of each
  # split.
  config.eval_windows = 512
  # Windows per evaluation batch.
  config.eval_batch_size = 128
  # QK-Clip's threshold τ (`muon_optax.qk_clip`, after any optimizer): heads
  # whose largest attention logit of a step exceeds it get their query and key
  # kernels rescaled. None: off.
  config.qk_clip = config_dict.placeholder(float)
  # Record the largest attention logit of every step (in the history as
  # `max_logit`; on with `qk_clip`).
  config.record_max_logits = False
  # `(data, fsdp)` device mesh shape, e.g. `(2, 4)`: batches split over all
  # devices, every parameter and optimizer-state leaf sharded on its largest
  # axis divisible by `fsdp`. None: one device.
  config.mesh = config_dict.placeholder(tuple)
  return config
