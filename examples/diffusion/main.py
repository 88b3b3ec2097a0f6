r"""Trains the DDPM U-Net with one optimizer, from a config file and overrides.

  python examples/diffusion/main.py   # the bundled digits, in seconds

  python examples/diffusion/main.py --workdir=/tmp/diffusion \
    --config=examples/diffusion/configs/default.py \
    --config.data=../shared/data/cifar10 --config.optimizer=muon \
    --config.learning_rate=0.01

`--config` is a config file (default `configs/tiny.py`);
`--config.FIELD=VALUE` sets any of its fields. Writes `WORKDIR/result.json`
(history and final figures, and `WORKDIR/samples.png`, a DDIM sample grid) and logs every evaluation.
"""

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# `import diffusion` also when run as a script from anywhere.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from diffusion import train  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parent / 'configs'
FLAGS = flags.FLAGS
flags.DEFINE_string(
  'workdir', 'runs/diffusion', 'Where result.json is written.'
)
config_flags.DEFINE_config_file(
  'config',
  str(CONFIGS / 'tiny.py'),
  'The training config file.',
  lock_config=True,
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  logging.set_verbosity(logging.INFO)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
