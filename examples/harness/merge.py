"""Results rebuilt from the `runs.partial.jsonl` of earlier invocations:
more seeds run apart, searches and full-budget runs merged."""

import argparse
import json
import math
import pathlib
import sys
from typing import Any

from harness import analysis
from harness import tasks


def merge(args: argparse.Namespace) -> dict[str, Any]:
  """Results from the `runs.partial.jsonl` files of earlier invocations.

  Per row, the search is its seed-0 runs at its shortest budget (the full
  one when it was searched at the full budget); the results are its
  full-budget runs at the best learning rate of that search, one per seed,
  or at the rate `--use-lr` sets for it.
  """
  task = tasks.TASKS[args.task]
  lines = []
  for d in args.merge:
    path = pathlib.Path(d) / 'runs.partial.jsonl'
    for x in path.read_text().splitlines():
      if x:
        r = json.loads(x)
        if 'workdir' in r:  # relative to its invocation's --out: to d
          r['workdir'] = str(pathlib.Path(d) / r['workdir'])
        lines.append(r)
  for r in lines:  # files written before rows had names
    r.setdefault('name', r['optimizer'])
  names = list(dict.fromkeys(r['name'] for r in lines))
  if args.optimizers:  # these rows only, in this order
    keep = [n for n in dict.fromkeys(args.optimizers.split(',')) if n.strip()]
    missing = sorted(set(keep) - set(names))
    if missing:
      raise SystemExit(f'--merge: no runs of {missing} in {list(args.merge)}.')
    lines = [r for r in lines if r['name'] in keep]
    names = keep
  full = max(r['total_steps'] for r in lines)
  use_lr = {
    name: lr
    for name, (lr,) in tasks.parse_grid(
      args.use_lr, names, flag='--use-lr', one=True
    ).items()
  }

  def score(r):
    v = r['history'][-1][task.metric]
    if math.isfinite(v):
      return v
    return -math.inf if task.higher_is_better else math.inf

  runs, tuning, chosen, searched, search_budget = [], {}, {}, {}, {}
  overridden = {}  # --use-lr: the search's best it replaced
  for name in names:
    mine = [r for r in lines if r['name'] == name]
    budget = min(r['total_steps'] for r in mine)
    search_budget[name] = budget / full
    grid: dict[float, float] = {}
    for r in mine:
      if r['seed'] == 0 and r['total_steps'] == budget:
        if r['learning_rate'] not in grid:
          searched.setdefault(name, []).append(r)
        grid.setdefault(r['learning_rate'], score(r))
    if not grid:
      raise SystemExit(f'--merge: no seed-0 run of {name} to choose from.')
    pick = max if task.higher_is_better else min
    best = pick(grid, key=grid.get)
    if name in use_lr:
      overridden[name], best = best, use_lr[name]
    tuning[name], chosen[name] = list(grid.items()), best
    seeds = set()
    for r in mine:
      if r['total_steps'] == full and r['learning_rate'] == best:
        if r['seed'] not in seeds:
          seeds.add(r['seed'])
          runs.append(r)
    if not seeds:
      why = (
        f'--use-lr sets {name} to lr {best:g}'
        if name in overridden
        else f'{name} does best at lr {best:g} in its search'
      )
      raise SystemExit(f'--merge: {why}, but no full-budget run has that lr.')
  order = {n: i for i, n in enumerate(names)}
  runs.sort(key=lambda r: (order[r['name']], r['seed']))
  last = runs[0]['history'][-1]
  return {
    'task': args.task,
    'data': args.data or task.embedded,
    'budget': f'{full} steps ({last["epoch"]:.2f} epochs)',
    'num_params': runs[0].get('num_params', 0),
    'tune_budget': min(search_budget.values()),
    'chosen_lr': chosen,
    'search_best_lr': overridden,
    'tuning': tuning,
    'search_budget': search_budget,
    'search_max_logits': analysis.search_max_logits(searched),
    'merged_from': list(args.merge),
    'command': ' '.join(['python', 'examples/compare.py', *sys.argv[1:]]),
    'runs': runs,
  }
