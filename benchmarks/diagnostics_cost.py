"""Cost of `diagnostics=True`: jitted update time with the metrics on ÷ off.

    python benchmarks/diagnostics_cost.py [--layers 12] [--d 384] [--runs 7]

Writes benchmarks/results/diagnostics_cost.{json,md}. Compile time is
excluded; on and off are timed in alternating rounds of the same run.
"""

import argparse
import json
import pathlib
import sys

import jax
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import timing  # noqa: E402
from benchmarks import trees  # noqa: E402
import muon_optax  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--layers', type=int, default=12)
  parser.add_argument('--d', type=int, default=384)
  parser.add_argument('--runs', type=int, default=7)
  parser.add_argument(
    '--out', default=str(pathlib.Path(__file__).parent / 'results')
  )
  args = parser.parse_args()
  tree = trees.gpt(num_layers=args.layers, d=args.d)
  params = tree.params
  grads = jax.tree.map(lambda x: 1e-3 * x + 1e-4, params)
  compiled = {}
  for name, on in (('off', False), ('on', True)):
    tx = muon_optax.muon(1e-3, param_labels=tree.labels, diagnostics=on)
    state = tx.init(params)

    def step(grads, state, params, tx=tx):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    fn, seconds = timing.compile_seconds(jax.jit(step), grads, state, params)
    compiled[name] = (fn, state, seconds)
  thunks = {
    name: (lambda fn=fn, state=state: fn(grads, state, params))
    for name, (fn, state, _) in compiled.items()
  }
  result = timing.interleaved(thunks, runs=args.runs)
  ratio = result['on'].median / result['off'].median
  record = {
    'tree': tree.describe(),
    'device': str(jax.devices()[0]),
    'jax': jax.__version__,
    'timings': {k: v.as_dict() for k, v in result.items()},
    'compile_s': {k: v[2] for k, v in compiled.items()},
    'on_over_off': ratio,
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'diagnostics_cost.json').write_text(json.dumps(record, indent=2))
  md = [
    f'# diagnostics=True cost, {tree.name} ({jax.devices()[0].platform})',
    '',
    '| variant | median ms | min–max ms | compile s |',
    '|---|---|---|---|',
  ]
  for k, v in result.items():
    md.append(
      f'| {k} | {1e3 * v.median:.1f} | {1e3 * v.min:.1f}–{1e3 * v.max:.1f} '
      f'| {compiled[k][2]:.2f} |'
    )
  md += ['', f'on ÷ off (ratio of medians, same run): **{ratio:.3f}**', '']
  (out / 'diagnostics_cost.md').write_text('\n'.join(md))
  print('\n'.join(md))


if __name__ == '__main__':
  main()
