"""Training the rows: the learning-rate search, the seeds, and the
interleaved step timing."""

import argparse
from collections.abc import Sequence
import json
import math
import pathlib
import sys
import time
from typing import Any

import numpy as np
import tqdm

from harness import analysis
from harness import tasks


def step_times(
  args: argparse.Namespace,
  train: Any,
  config: Any,
  rows: dict[str, tuple[str, dict]],
  grids: dict[str, tuple[float, ...]],
) -> dict[str, Any]:
  """Each row's train step, timed round-robin after two warm-up steps."""
  task = tasks.TASKS[args.task]
  batch = train.example_batch(config)
  steps, num_params = {}, None
  for name, (base, kwargs) in rows.items():
    grid = grids[name]
    cfg = tasks.with_changes(
      tasks.row_config(config, base, kwargs), learning_rate=grid[len(grid) // 2]
    )
    if task.budget == 'epochs':
      model, _, step = train.create_train_state(cfg, 10, 1000)
    else:
      model, _, step = train.create_train_state(cfg)
    num_params = train.count_params(model)
    for _ in range(2):  # compile, then one more
      step(*batch).block_until_ready()
    steps[name] = step
  times: dict[str, list[float]] = {name: [] for name in rows}
  for _ in range(args.step_times):
    for name, step in steps.items():
      t0 = time.perf_counter()
      step(*batch).block_until_ready()
      times[name].append(time.perf_counter() - t0)
  median = {name: float(np.median(t)) for name, t in times.items()}
  return {
    'task': args.task,
    'num_params': num_params,
    'batch_size': config.batch_size,
    'rounds': args.step_times,
    'median_ms': {n: 1e3 * m for n, m in median.items()},
    'min_ms': {n: 1e3 * float(np.min(t)) for n, t in times.items()},
    'vs_adamw': {
      n: m / median['adamw'] for n, m in median.items() if 'adamw' in median
    },
    'command': ' '.join(['python', 'examples/compare.py', *sys.argv[1:]]),
  }


def describe_budget(task: tasks.Task, config: Any, run: dict[str, Any]) -> str:
  if task.budget == 'epochs':
    return (
      f'{run["total_steps"]} steps = {config.epochs:g} epochs of '
      f'{run["steps_per_epoch"]} batches of {config.batch_size}'
    )
  epochs = run['history'][-1]['epoch']
  if hasattr(config, 'context'):
    return (
      f'{run["total_steps"]} steps of {config.batch_size}×{config.context} '
      f'tokens ({epochs:.2f} epochs)'
    )
  return (
    f'{run["total_steps"]} steps of {config.batch_size} images '
    f'({epochs:.2f} epochs)'
  )


def train_rows(
  args: argparse.Namespace,
  train: Any,
  config: Any,
  rows: dict[str, tuple[str, dict]],
  grids: dict[str, tuple[float, ...]],
  out: pathlib.Path,
  argv: Sequence[str] | None,
) -> dict[str, Any]:
  """Every row: a seed-0 run per learning rate of its grid (at
  `--tune-budget` of the budget), the best by the final validation metric,
  then the other seeds at it. Each finished run is appended to
  `out/runs.partial.jsonl` as it ends."""
  task = tasks.TASKS[args.task]
  reuse = args.tune_budget >= 1.0
  tune_config = (
    config if reuse else tasks.scale_budget(config, task, args.tune_budget)
  )
  total = sum(len(grids[n]) + args.seeds - reuse for n in rows)
  bar = tqdm.tqdm(total=total, desc='runs', disable=args.no_progress)
  partial = out / 'runs.partial.jsonl'  # one line per finished run
  partial.write_text('')

  def run(name, cfg, lr, seed, tune):
    base, kwargs = rows[name]
    cfg = tasks.with_changes(
      tasks.row_config(cfg, base, kwargs), learning_rate=lr, seed=seed
    )
    suffix = '_search' if tune and not reuse else ''
    workdir = out / 'runs' / f'{name}_lr{lr:g}_seed{seed}{suffix}'
    r = {
      'name': name,
      **train.train_and_evaluate(cfg, workdir),
      'workdir': str(workdir.relative_to(out)),
    }
    bar.update()
    tqdm.tqdm.write(
      f'  {name} lr={lr:g} seed={seed}: {task.metric} '
      f'{r["history"][-1][task.metric]:.4f}, '
      f'{1e3 * r["step_time"]:.0f} ms/step'
    )
    with partial.open('a') as f:
      f.write(json.dumps(r) + '\n')
    return r

  done, tuning, chosen, searched, routing = [], {}, {}, {}, None
  t0 = time.time()
  for name in rows:
    scores = []
    for lr in grids[name]:
      r = run(name, tune_config, lr, args.first_seed, tune=True)
      routing = routing or r.get('routing')
      score = r['history'][-1][task.metric]
      if not math.isfinite(score):
        score = -math.inf if task.higher_is_better else math.inf
      scores.append((lr, score, r))
    pick = max if task.higher_is_better else min
    best = pick(scores, key=lambda s: s[1])
    tuning[name] = [(lr, s) for lr, s, _ in scores]
    searched[name] = [r for _, _, r in scores]
    chosen[name] = best[0]
    tqdm.tqdm.write(
      f'{name}: lr {best[0]:g} ({task.metric} {best[1]:.4f} on seed '
      f'{args.first_seed})'
    )
    if reuse:
      done.append(best[2])
    first = args.first_seed + (1 if reuse else 0)  # reuse: already run
    for seed in range(first, args.first_seed + args.seeds):
      done.append(run(name, config, best[0], seed, tune=False))
  bar.close()
  if routing:
    (out / 'routing.txt').write_text(routing + '\n')

  results = {
    'task': args.task,
    'data': config.data or task.embedded,
    'budget': describe_budget(task, config, done[0]),
    'num_params': done[0]['num_params'],
    'config': config.to_dict(),
    'tune_budget': args.tune_budget,
    'search_seed': args.first_seed,
    'rows': {n: {'optimizer': b, 'kwargs': k} for n, (b, k) in rows.items()},
    'grids': {n: list(grids[n]) for n in rows},
    'chosen_lr': chosen,
    'tuning': tuning,
    'search_max_logits': analysis.search_max_logits(searched),
    'command': ' '.join(
      [
        'python',
        'examples/compare.py',
        *(sys.argv[1:] if argv is None else argv),
      ]
    ),
    'total_seconds': time.time() - t0,
    'runs': done,
  }
  return results
