"""Default hyperparameters: the ConvNet on CIFAR-10 (set `data` to it).

`--config.FIELD=VALUE` sets any field below (absl flags,
`ml_collections.config_flags`).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The CIFAR-10 ConvNet: airbench-style, 295k parameters, 8 epochs."""
  config = ml_collections.ConfigDict()
  # A folder with `train/<class>/*.jpg` (and `test/`), or
  # `train.tar.gz`/`test.tar.gz`, or `cifar-10-batches-py/`; None: the digits
  # bundled with scikit-learn (no download).
  config.data = config_dict.placeholder(str)
  # Where decoded images are cached as `.npy`; None: `$MUON_OPTAX_CACHE` or
  # `~/.cache/muon_optax`.
  config.cache_dir = config_dict.placeholder(str)
  # When the data has no test split, training images held out as one (before
  # the validation split); None: a fifth, at most 10,000.
  config.test_size = config_dict.placeholder(int)
  # Training images held out for validation (the learning-rate choice); the
  # test split is never used for it.
  config.val_size = 5000
  # A fixed subset of the remaining images to train on; None keeps them all.
  config.train_size = config_dict.placeholder(int)
  # Random horizontal flips.
  config.flip = True
  # Random translations by up to this many pixels.
  config.translate = 2
  # Stem width, then one conv group per further width.
  config.widths = (24, 32, 64, 128)
  # `muon`, `adamw`, `nadamw`, `sgd` or `optax_muon`.
  config.optimizer = 'muon'
  # More keyword arguments of the optimizer, e.g. `{'beta': 0.6}` for `muon`:
  # set in a config file or by compare.py's `--variant` (flags cannot add
  # keys).
  config.optimizer_kwargs = ml_collections.ConfigDict()
  # `muon` and `normuon` only: fnmatch patterns naming the output head, which
  # goes to the Adam part (`muon_optax.route`'s `head_names`); None: the
  # library's; empty (`--config.head_names=()`): the head goes to Muon.
  config.head_names = config_dict.placeholder(tuple)
  # Peak learning rate.
  config.learning_rate = 0.01
  # Linear warm-up over this fraction of the steps, then linear decay to 0.
  config.warmup_fraction = 0.1
  # Training batch size.
  config.batch_size = 128
  # Training epochs over the training split.
  config.epochs = 8.0
  # Initialization, shuffling and augmentation seed.
  config.seed = 0
  # Validation points per epoch.
  config.evals_per_epoch = 4
  # Evaluation batch size.
  config.eval_batch_size = 500
  return config
