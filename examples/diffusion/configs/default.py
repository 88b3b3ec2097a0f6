"""Default hyperparameters: the DDPM U-Net on CIFAR-10 (set `data` to it).

`--config.FIELD=VALUE` sets any field below (absl flags,
`ml_collections.config_flags`).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The CIFAR-10 U-Net: 2.0M parameters, 2,000 steps of 32 images."""
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
  # Channels per U-Net level (resolution 32/patch, then halved).
  config.widths = (32, 64, 128)
  # Residual blocks per level, down and up.
  config.blocks = 1
  # Attention heads at the lowest resolution.
  config.heads = 4
  # GroupNorm groups (at most).
  config.groups = 8
  # The stem's patch size (and the head's): the levels run at 32/patch and
  # below.
  config.patch = 2
  # Diffusion steps T of the cosine schedule.
  config.timesteps = 1000
  # `muon`, `adamw`, `nadamw`, `sgd`, `optax_muon` or `normuon`.
  config.optimizer = 'muon'
  # More keyword arguments of the optimizer, e.g. `{'b2': 0.99}` for `adamw`:
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
  config.batch_size = 32
  # Training steps.
  config.steps = 2000
  # Initialization, shuffling, noise and augmentation seed.
  config.seed = 0
  # Steps between validation points.
  config.eval_every = 250
  # Validation images scored at each point (the head of the validation split);
  # the test split is scored whole, once, at the end.
  config.eval_size = 2000
  # Noise levels of the held-out loss: image i is noised at the midpoint of
  # stratum i mod `eval_levels` of [0, T), with noise drawn from a key that
  # depends on i alone, the same for every run.
  config.eval_levels = 10
  # Evaluation batch size.
  config.eval_batch_size = 250
  # Images drawn at the end (DDIM, from fixed noise) for the grid.
  config.samples = 64
  # DDIM steps per sample.
  config.sample_steps = 50
  return config
