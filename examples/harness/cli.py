"""`compare.py`'s command line: which task, rows, grids, budget and seeds,
then training, timing or merging, and the report."""

import argparse
from collections.abc import Sequence
import importlib
import pathlib
import sys
from typing import Any

from harness import merge
from harness import report
from harness import runs
from harness import tasks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split('\n')[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument('--task', choices=tuple(tasks.TASKS), default='convnet')
  p.add_argument(
    '--data',
    default=None,
    help='convnet, resnet, diffusion: a folder with train/ (and test/) '
    'class folders, or train.tar.gz/test.tar.gz, or cifar-10-batches-py/; '
    'transformer: a text file. Default: embedded data that needs no '
    'download.',
  )
  p.add_argument(
    '--config',
    default=None,
    help='a config file of the task; default: <task>/configs/default.py '
    'with --data, <task>/configs/tiny.py without.',
  )
  p.add_argument(
    '--optimizers',
    default=None,
    help=f'rows to train (default: {",".join(tasks.DEFAULT_OPTIMIZERS)}); with '
    '--merge, the rows to keep, in this order (default: every row in the '
    'files).',
  )
  p.add_argument(
    '--variant',
    nargs='+',
    default=[],
    metavar='NAME=BASE:KEY=VALUE,...',
    help='an extra row: BASE with these keyword arguments, e.g. '
    "muon_beta0.6=muon:beta=0.6 (its grid is BASE's unless --lr-grid).",
  )
  p.add_argument('--seeds', type=int, default=2)
  p.add_argument(
    '--first-seed',
    type=int,
    default=0,
    help='run seeds FIRST..FIRST+SEEDS-1 and search on FIRST: more seeds '
    'of an earlier invocation, to --merge with it.',
  )
  budget = p.add_mutually_exclusive_group()
  budget.add_argument('--epochs', type=float, default=None)
  budget.add_argument('--steps', type=int, default=None)
  p.add_argument('--train-size', type=int, default=None)
  p.add_argument('--batch-size', type=int, default=None)
  p.add_argument(
    '--lr-grid',
    nargs='+',
    default=[],
    metavar='NAME=LR,...',
    help='e.g. --lr-grid muon=0.01,0.02 adamw=3e-3 (others keep the default).',
  )
  p.add_argument(
    '--tune-budget',
    type=float,
    default=1.0,
    help='fraction of the budget (same schedule shape, compressed) for the '
    'learning-rate search; at 1.0 the chosen seed-0 run is reused.',
  )
  p.add_argument('--out', default=None, help='default: runs/<task>')
  p.add_argument(
    '--set',
    nargs='+',
    default=[],
    metavar='FIELD=VALUE',
    help='any other field of the task config, e.g. val_size=2000 '
    'widths=16,32,64.',
  )
  p.add_argument('--cache-dir', default=None)
  p.add_argument(
    '--merge',
    nargs='+',
    default=None,
    metavar='DIR',
    help='train nothing: rebuild summary.md, results.json and plots in --out '
    'from the runs.partial.jsonl of these runs (e.g. extra seeds run '
    'separately). Full-budget runs are the results; shorter ones the grid.',
  )
  p.add_argument(
    '--use-lr',
    nargs='+',
    default=[],
    metavar='NAME=LR',
    help="with --merge: NAME's results are its full-budget runs at LR, not "
    "at its search's best (e.g. where that rate diverged at the full "
    'budget); the summary says so.',
  )
  p.add_argument(
    '--diagnostics',
    action='store_true',
    help="record muon's per-layer orthogonality error and update/weight RMS "
    'and plot them (layer_metrics.png); adds its cost to its step time.',
  )
  p.add_argument(
    '--mesh',
    default=None,
    metavar='DATA,FSDP',
    help='transformer: train data-parallel + FSDP on a (data, fsdp) device '
    'mesh, e.g. 2,4 (batches over all devices, parameters and optimizer '
    'state sharded over fsdp). On a CPU the devices are emulated.',
  )
  p.add_argument(
    '--step-times',
    type=int,
    default=None,
    metavar='ROUNDS',
    help="train nothing: time each optimizer's train step on this config, "
    'round-robin over the optimizers for ROUNDS rounds after a warm-up, so '
    'that load from other processes hits all alike; writes '
    'step_times.{md,json}.',
  )
  p.add_argument('--no-progress', action='store_true')
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = pathlib.Path(args.out or f'runs/{args.task}')
  out.mkdir(parents=True, exist_ok=True)
  if args.merge:
    results = merge.merge(args)
    report.write(results, out)
    return results
  if args.use_lr:
    raise SystemExit('--use-lr is for --merge: --lr-grid sets what trains.')
  if str(tasks.HERE) not in sys.path:
    sys.path.insert(0, str(tasks.HERE))
  train = importlib.import_module(f'{args.task}.train')
  config = tasks.task_config(args)

  names = args.optimizers
  if names is None:  # '' trains --variant rows only
    names = ','.join(tasks.DEFAULT_OPTIMIZERS)
  rows = {n: (n, {}) for n in names.split(',') if n.strip()}
  for name in rows:
    if name not in tasks.BASE_OPTIMIZERS:
      raise SystemExit(
        f'Unknown optimizer {name!r}; known: {tasks.BASE_OPTIMIZERS} (and '
        '--variant for others).'
      )
  rows.update(tasks.parse_variants(args.variant))
  if not rows:
    raise SystemExit('No rows to train: give --optimizers or --variant.')
  if args.diagnostics:
    for name, (base, kwargs) in rows.items():
      if base == 'muon':
        rows[name] = (base, {**kwargs, 'diagnostics': True})
  if args.seeds < 1 or args.first_seed < 0:
    raise SystemExit(
      f'--seeds must be at least 1 and --first-seed at least 0, got '
      f'{args.seeds} and {args.first_seed}.'
    )
  for base, kwargs in rows.values():  # a bad config.FIELD fails now
    tasks.row_config(config, base, kwargs)
  grids = {
    n: tasks.DEFAULT_GRIDS[args.task][base] for n, (base, _) in rows.items()
  }
  grids.update(tasks.parse_grid(args.lr_grid, list(rows)))

  if args.step_times is not None:
    result = runs.step_times(args, train, config, rows, grids)
    report.write_step_times(result, out)
    return result

  results = runs.train_rows(args, train, config, rows, grids, out, argv)
  report.write(results, out)
  return results
