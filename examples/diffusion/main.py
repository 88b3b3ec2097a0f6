r"""Trains the DDPM U-Net with one optimizer, from a config file and overrides.

  python examples/diffusion/main.py   # the bundled digits, in seconds

  python examples/diffusion/main.py --workdir=/tmp/diffusion \
    --config.data=../shared/data/cifar10 --config.optimizer=muon \
    --config.learning_rate=0.01

Without `--config`, the config is `configs/default.py` when the command
line sets `--config.data`, else `configs/tiny.py`. Writes
`WORKDIR/result.json` (history and final figures) and `WORKDIR/samples.png`
(a DDIM sample grid), and logs every evaluation. `--config.FIELD=VALUE` sets
any field of `configs/default.py`.
"""

import argparse
from collections.abc import Sequence
import importlib.util
import logging
import pathlib
import sys

# `import diffusion` also when run as a script from anywhere.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from diffusion import train  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parent / 'configs'


def load_config(path: str | pathlib.Path):
  """`get_config()` of the config file at `path`."""
  spec = importlib.util.spec_from_file_location('config_file', path)
  if spec is None or not pathlib.Path(path).is_file():
    raise FileNotFoundError(f'`--config` {str(path)!r} is not a file.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='runs/diffusion')
  parser.add_argument('--config', default=None)
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.') or '=' not in a]
  if bad:
    parser.error(f'unrecognized arguments: {bad} (--config.FIELD=VALUE)')
  path = args.config
  if path is None:
    data = any(a.startswith('--config.data=') for a in rest)
    path = CONFIGS / ('default.py' if data else 'tiny.py')
  config = load_config(path)
  config = config.override([a.removeprefix('--config.') for a in rest])
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  return train.train_and_evaluate(config, args.workdir)


if __name__ == '__main__':
  main()
