r"""Trains the byte-level Transformer with one optimizer, from a config file and overrides.

  python examples/transformer/main.py --workdir=/tmp/transformer \
    --config=examples/transformer/configs/default.py \
    --config.data=../shared/data/tinyshakespeare/input.txt \
    --config.optimizer=muon --config.learning_rate=0.01

`--config` is a config file (default `configs/default.py`);
`--config.FIELD=VALUE` sets any of its fields. Writes `WORKDIR/result.json`
(history and final figures) and logs every evaluation.
"""

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# `import transformer` also when run as a script from anywhere.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from transformer import train  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parent / 'configs'
FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where result.json is written.')
config_flags.DEFINE_config_file(
  'config',
  str(CONFIGS / 'default.py'),
  'The training config file.',
  lock_config=True,
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  logging.set_verbosity(logging.INFO)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
