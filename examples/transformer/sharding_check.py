"""Data-parallel + FSDP training of the Transformer example on 8 devices.

Run by `train_test.py` in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`; prints one JSON line:
the largest relative difference of the loss history from the one-device run,
and the layouts training left the parameters and optimizer state in.
"""

import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from transformer import train  # noqa: E402
from transformer.configs import tiny  # noqa: E402

MESH = (2, 4)


def _config(optimizer, mesh=None):
  config = tiny.get_config()
  config.update(
    optimizer=optimizer,
    learning_rate=1e-2,
    d_model=32,
    num_heads=2,
    context=16,
    batch_size=16,
    steps=4,
    eval_every=2,
    eval_windows=32,
    eval_batch_size=16,
    max_bytes=50_000,
    mesh=mesh,
  )
  return config


def check(optimizer: str) -> dict:
  """One run on one device, one on the (2, 4) mesh."""
  single = train.train_and_evaluate(_config(optimizer), None)
  sharded = train.train_and_evaluate(_config(optimizer, MESH), None)
  rel = max(
    abs(a[k] - b[k]) / abs(a[k])
    for a, b in zip(single['history'], sharded['history'], strict=True)
    for k in ('train_loss', 'val_loss')
  )
  params = sharded['param_shardings'].values()
  state = [s for s in sharded['state_shardings'].values() if len(s) == 2]
  return {
    'optimizer': optimizer,
    'devices': jax.device_count(),
    'run_mesh': sharded['mesh'],
    'single_device_placed_nothing': single['param_shardings'] is None,
    'rel_err': rel,
    'layouts_kept': sharded['layouts_kept'],
    'matrices_sharded': all(
      'fsdp' in spec for spec in params if len(spec) >= 2
    ),
    'state_matrices_sharded': all('fsdp' in spec for spec in state),
    'state_matrices': len(state),
  }


if __name__ == '__main__':
  for name in sys.argv[1:] or ['muon', 'adamw']:
    print(json.dumps(check(name)), flush=True)
