"""Per-device FLOPs and communication of one Muon update on 8 devices.

Compiles `scale_by_muon`'s update for a mixed tree (a stacked group of 8
layers plus single large matrices) on one device and on 8 emulated CPU
devices under several layouts, and reports from the compiled programs:

- per-device FLOPs (`cost_analysis()`), and their fraction of one device's;
- the bytes each device moves per update in every collective
  (all-gather, all-reduce, all-to-all, reduce-scatter, collective-permute),
  summed over the result shapes of those ops in the partitioned HLO.

Nothing is executed, so the numbers do not depend on the machine's load.

  python benchmarks/sharding.py [--json]
"""

import json
import math
import os
import re
import sys

FLAG = '--xla_force_host_platform_device_count=8'
if FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {FLAG}'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import muon_optax  # noqa: E402

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

MIXED = {
  'layers': (8, 256, 256),
  'w_in': (256, 1024),
  'w_out': (1024, 256),
  'big': (512, 512),
}
# PartitionSpecs over a (2, 4) ('data', 'model') mesh; 'A' is both axes.
A = ('data', 'model')
LAYOUTS = {
  'replicated (data-parallel)': {},
  'fsdp (rows)': {
    'layers': P(None, A, None),
    'w_in': P(A, None),
    'w_out': P(A, None),
    'big': P(A, None),
  },
  'fsdp (cols)': {
    'layers': P(None, None, A),
    'w_in': P(None, A),
    'w_out': P(None, A),
    'big': P(None, A),
  },
  'tensor-parallel + fsdp': {
    'layers': P(None, 'data', 'model'),
    'w_in': P('data', 'model'),
    'w_out': P('model', 'data'),
    'big': P('data', 'model'),
  },
  'stacked (layer axis)': {'layers': P(A, None, None)},
}
COLLECTIVES = (
  'all-gather',
  'all-reduce',
  'all-to-all',
  'reduce-scatter',
  'collective-permute',
)
_DTYPE_BYTES = {
  'f64': 8,
  'f32': 4,
  'bf16': 2,
  'f16': 2,
  's32': 4,
  'u32': 4,
  'pred': 1,
}
_OP = re.compile(
  r'=\s*(?P<shape>\(?[a-z0-9]+\[[^=]*?)\s+'
  r'(?P<op>' + '|'.join(COLLECTIVES) + r')(?:-start)?\('
)
_ARRAY = re.compile(r'([a-z]+[0-9]*)\[([0-9,]*)\]')


def _bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    n = math.prod(int(d) for d in dims.split(',') if d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes in the results of every collective op, per kind, per device."""
  out = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo_text.splitlines():
    m = _OP.search(re.sub(r'/\*.*?\*/', '', line))
    if m:
      out[m['op']] += _bytes(m['shape'])
  return out


def _params(mesh=None, specs=None):
  params = {k: jnp.zeros(s, jnp.float32) for k, s in MIXED.items()}
  if mesh is None:
    return params
  return {
    k: jax.device_put(x, NamedSharding(mesh, specs.get(k, P())))
    for k, x in params.items()
  }


def _compile(tx, params, mesh=None):
  state = tx.init(params)
  if mesh is None:
    return jax.jit(tx.update).lower(params, state).compile()
  with jax.set_mesh(mesh):
    return jax.jit(tx.update).lower(params, state).compile()


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost['flops'])


def run() -> dict:
  tx = muon_optax.scale_by_muon(
    matrix_views={'layers': muon_optax.MatrixView.dense()},
    group_strategy='stack',
  )
  single = _flops(_compile(tx, _params()))
  update_bytes = 4 * sum(math.prod(s) for s in MIXED.values())
  mesh = jax.make_mesh((2, 4), ('data', 'model'))
  rows = {}
  for name, specs in LAYOUTS.items():
    compiled = _compile(tx, _params(mesh, specs), mesh)
    flops = _flops(compiled)
    rows[name] = {
      'flops_per_device': flops,
      'fraction_of_single_device': flops / single,
      'collective_bytes_per_device': collective_bytes(compiled.as_text()),
    }
  return {
    'tree': {k: list(s) for k, s in MIXED.items()},
    'devices': 8,
    'update_bytes': update_bytes,
    'single_device_flops': single,
    'layouts': rows,
  }


def _markdown(result: dict) -> str:
  mib = lambda b: f'{b / 2**20:.2f}'
  lines = [
    f'Mixed tree {result["tree"]}, 8 devices; one update is '
    f'{mib(result["update_bytes"])} MiB. Single device: '
    f'{result["single_device_flops"] / 1e9:.2f} GFLOP.',
    '',
    '| layout | GFLOP/device | fraction | MiB/device: '
    + ' | '.join(COLLECTIVES)
    + ' |',
    '|---|---|---|' + '---|' * len(COLLECTIVES),
  ]
  for name, r in result['layouts'].items():
    c = r['collective_bytes_per_device']
    lines.append(
      f'| {name} | {r["flops_per_device"] / 1e9:.3f} | '
      f'{r["fraction_of_single_device"]:.3f} | '
      + ' | '.join(mib(c[k]) for k in COLLECTIVES)
      + ' |'
    )
  return '\n'.join(lines)


if __name__ == '__main__':
  result = run()
  print(
    json.dumps(result, indent=1) if '--json' in sys.argv else _markdown(result)
  )
