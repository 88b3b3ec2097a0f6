"""Cost of NorMuon over Muon: optimizer-state bytes and jitted update time.

    python benchmarks/normuon_cost.py [--runs 9] [--trees gpt,resnet]

On the GPT-like and ResNet-18-like trees of benchmarks/trees.py (the same
labels for both optimizers), `normuon` and `muon` with default settings:
the bytes of every array leaf of the optimizer state, and the time of one
jitted `update` (compile excluded: lowered and compiled first, then warmed
up; the two are timed in alternating rounds of the same run and compared
by the ratio of medians). Writes benchmarks/results/normuon_cost.{json,md}.
"""

import argparse
import json
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import timing  # noqa: E402
from benchmarks import trees  # noqa: E402
import muon_optax  # noqa: E402

TREES = {'gpt': trees.gpt, 'resnet': trees.resnet}
VARIANTS = {'muon': muon_optax.muon, 'normuon': muon_optax.normuon}


def state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state))


def measure(tree: trees.Tree, runs: int) -> dict:
  params = tree.params
  grads = jax.tree.map(lambda x: 1e-3 * x + 1e-4, params)
  compiled, states, record = {}, {}, {}
  for name, make in VARIANTS.items():
    tx = make(1e-3, param_labels=tree.labels)
    state = tx.init(params)
    fn, seconds = timing.compile_seconds(
      jax.jit(tx.update), grads, state, params
    )
    compiled[name], states[name] = fn, state
    record[name] = {'state_bytes': state_bytes(state), 'compile_s': seconds}
  nor = states['normuon'].inner_states['muon'].inner_state[1]
  record['normuon']['v_bytes'] = state_bytes(nor.v)
  thunks = {
    name: (lambda fn=fn, s=states[name]: fn(grads, s, params))
    for name, fn in compiled.items()
  }
  # Samples of at least 0.5 s: many calls averaged for the small tree, so
  # that other people's load averages out within a sample.
  result = timing.interleaved(thunks, runs=runs, min_sample_s=0.5)
  for name, t in result.items():
    record[name]['timing'] = t.as_dict()
  param_bytes = state_bytes(params)
  return {
    'tree': tree.describe(),
    'param_bytes': param_bytes,
    'variants': record,
    'state_bytes_ratio': (
      record['normuon']['state_bytes'] / record['muon']['state_bytes']
    ),
    'extra_state_over_params': (
      (record['normuon']['state_bytes'] - record['muon']['state_bytes'])
      / param_bytes
    ),
    'time_ratio': result['normuon'].median / result['muon'].median,
  }


def markdown(records: list[dict]) -> str:
  platform = jax.devices()[0].platform
  md = [
    f'# NorMuon cost over Muon ({platform}, jax {jax.__version__})',
    '',
    'Optimizer-state bytes (every array leaf) and the median time of one '
    'jitted `update`, `normuon` and `muon` timed in alternating rounds of '
    'the same run (compile excluded). The machine is shared: compare the '
    'ratios, not the milliseconds. `python benchmarks/normuon_cost.py`.',
    '',
    '| tree | params MiB | muon state MiB | normuon state MiB | v MiB | '
    'state ratio | muon ms | normuon ms | time ratio |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  mb = lambda b: f'{b / 2**20:.2f}'
  for r in records:
    m, n = r['variants']['muon'], r['variants']['normuon']
    md.append(
      f'| {r["tree"]["name"]} | {mb(r["param_bytes"])} '
      f'| {mb(m["state_bytes"])} | {mb(n["state_bytes"])} '
      f'| {mb(n["v_bytes"])} | {r["state_bytes_ratio"]:.4f} '
      f'| {1e3 * m["timing"]["median_s"]:.1f} '
      f'| {1e3 * n["timing"]["median_s"]:.1f} | {r["time_ratio"]:.3f} |'
    )
  spread = [
    f'{r["tree"]["name"]}: {v} {1e3 * t["min_s"]:.1f}–{1e3 * t["max_s"]:.1f}'
    f' ms ({t["runs"]} runs of {t["calls_per_run"]} calls)'
    for r in records
    for v, t in ((v, r['variants'][v]['timing']) for v in VARIANTS)
  ]
  md += ['', 'Spread (min–max): ' + '; '.join(spread) + '.', '']
  return '\n'.join(md)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--runs', type=int, default=9)
  parser.add_argument('--trees', default=','.join(TREES))
  parser.add_argument(
    '--out', default=str(pathlib.Path(__file__).parent / 'results')
  )
  args = parser.parse_args()
  records = [measure(TREES[t](), args.runs) for t in args.trees.split(',')]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  payload = {
    'device': str(jax.devices()[0]),
    'jax': jax.__version__,
    'numpy': np.__version__,
    'trees': records,
  }
  (out / 'normuon_cost.json').write_text(json.dumps(payload, indent=2))
  text = markdown(records)
  (out / 'normuon_cost.md').write_text(text)
  print(text)


if __name__ == '__main__':
  main()
