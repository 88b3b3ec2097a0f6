r"""Optimizers compared on the examples: a learning-rate grid, seeds, plots.

  python examples/compare.py [--task {convnet,resnet,transformer,diffusion}]
      [--data PATH] [--optimizers muon,adamw,nadamw,sgd,optax_muon]
      [--variant NAME=BASE:KEY=VALUE,...] [--seeds N] [--first-seed K]
      [--epochs E | --steps S] [--train-size N] [--lr-grid NAME=LR,LR ...]
      [--tune-budget F] [--set FIELD=VALUE ...] [--mesh DATA,FSDP]
      [--out DIR] [--merge DIR ...]

The harness around the three examples (each runs alone through its
`main.py`): for each optimizer, one seed-0 run per learning rate of its grid,
judged by the final validation metric (a test split is never looked at for
this); then the other seeds at the chosen learning rate. Every run has the
same budget, data order per seed and schedule shape (linear warm-up, linear
decay). Writes DIR/summary.md, DIR/results.json, DIR/*.png and, as it goes,
DIR/runs.partial.jsonl (one line per finished run).

With no arguments: the ConvNet on scikit-learn's bundled digits, about a
minute on two CPU cores.
"""

import argparse
import ast
from collections.abc import Sequence
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
import tqdm

HERE = pathlib.Path(__file__).resolve().parent
BASE_OPTIMIZERS = ('muon', 'adamw', 'nadamw', 'sgd', 'optax_muon', 'normuon')
# Compared unless --optimizers says otherwise (normuon is opt-in).
DEFAULT_OPTIMIZERS = BASE_OPTIMIZERS[:5]
BASELINES = ('adamw', 'nadamw', 'sgd')  # what Muon must reach, in order
# Rows of these optimizers get "to reach" figures: against the baselines,
# and (all but the row named muon) against the row named muon.
OURS = ('muon', 'normuon')


@dataclasses.dataclass(frozen=True)
class Task:
  metric: str  # validation metric of the history; picks the learning rate
  final_metric: str  # reported, on the held-out test split
  higher_is_better: bool
  budget: str  # the config field of the budget: 'epochs' or 'steps'
  embedded: str  # the data without --data


TASKS = {
  'convnet': Task(
    'val_accuracy', 'test_accuracy', True, 'epochs', 'sklearn digits'
  ),
  'resnet': Task(
    'val_accuracy', 'test_accuracy', True, 'epochs', 'sklearn digits'
  ),
  'transformer': Task(
    'val_loss', 'test_loss', False, 'steps', 'Python stdlib sources'
  ),
  'diffusion': Task('val_loss', 'test_loss', False, 'steps', 'sklearn digits'),
}

#: Peak learning-rate grids of the embedded-data runs; pass `--lr-grid` for
#: real data (examples/README.md has the grids that bracket there).
DEFAULT_GRIDS = {
  'convnet': {
    'muon': (0.02, 0.05, 0.1),
    'normuon': (0.02, 0.05, 0.1),
    'adamw': (1e-2, 3e-2, 1e-1),
    'nadamw': (3e-3, 1e-2, 3e-2),
    'sgd': (0.05, 0.1, 0.2),
    'optax_muon': (3e-3, 1e-2, 3e-2),
  },
  'resnet': {
    'muon': (0.01, 0.02, 0.05),
    'normuon': (0.01, 0.02, 0.05),
    'adamw': (1e-3, 3e-3, 1e-2),
    'nadamw': (1e-3, 3e-3, 1e-2),
    'sgd': (0.03, 0.1, 0.3),
    'optax_muon': (1e-3, 3e-3, 1e-2),
  },
  'transformer': {
    'muon': (1e-2, 2e-2, 4e-2),
    'normuon': (1e-2, 2e-2, 4e-2),
    'adamw': (3e-3, 1e-2, 3e-2),
    'nadamw': (3e-3, 1e-2, 3e-2),
    'sgd': (0.03, 0.1, 0.3),
    'optax_muon': (1e-2, 3e-2, 1e-1),
  },
  'diffusion': {
    'muon': (0.01, 0.02, 0.04),
    'normuon': (0.01, 0.02, 0.04),
    'adamw': (1e-3, 3e-3, 1e-2),
    'nadamw': (1e-3, 3e-3, 1e-2),
    'sgd': (0.03, 0.1, 0.3),
    'optax_muon': (3e-3, 1e-2, 3e-2),
  },
}

# Set per run by the harness, not through --set.
_HARNESS_FIELDS = ('optimizer', 'optimizer_kwargs', 'learning_rate', 'seed')


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _parse_variants(items: Sequence[str]) -> dict[str, tuple[str, dict]]:
  """`NAME=BASE:KEY=VALUE,...` -> {NAME: (BASE, kwargs)}.

  A key `config.FIELD` sets a field of the task's config for this row only
  (e.g. `muon_qkclip=muon:config.qk_clip=30.0`); the others are keyword
  arguments of the optimizer.
  """
  variants = {}
  for item in items:
    name, sep, spec = item.partition('=')
    base, _, options = spec.partition(':')
    if not sep or not name or base not in BASE_OPTIMIZERS:
      raise SystemExit(
        f'--variant takes NAME=BASE:KEY=VALUE,... with BASE in '
        f'{list(BASE_OPTIMIZERS)}, e.g. muon_beta0.6=muon:beta=0.6; got '
        f'{item!r}.'
      )
    kwargs = {}
    for option in filter(None, options.split(',')):
      key, sep, value = option.partition('=')
      if not sep:
        raise SystemExit(
          f'--variant {name}: expected KEY=VALUE, got {option!r}.'
        )
      kwargs[key] = _literal(value)
    variants[name] = (base, kwargs)
  return variants


def _row_config(config: Any, base: str, kwargs: dict[str, Any]) -> Any:
  """`config` set up for one row: its optimizer, the optimizer's keyword
  arguments, and the row's own `config.FIELD` values."""
  fields = {
    k.removeprefix('config.'): v
    for k, v in kwargs.items()
    if k.startswith('config.')
  }
  allowed = {f.name for f in dataclasses.fields(config)} - set(_HARNESS_FIELDS)
  for field in fields:
    if field not in allowed:
      raise SystemExit(
        f'--variant: a row may set config.FIELD with FIELD one of '
        f'{sorted(allowed)}, got config.{field}.'
      )
  optimizer_kwargs = {
    k: v for k, v in kwargs.items() if not k.startswith('config.')
  }
  return config.replace(
    optimizer=base, optimizer_kwargs=optimizer_kwargs, **fields
  )


def _parse_grid(
  items: Sequence[str], names: Sequence[str]
) -> dict[str, tuple[float, ...]]:
  grid = {}
  for item in items:
    name, sep, values = item.partition('=')
    if not sep or name not in names:
      raise SystemExit(
        f'--lr-grid takes NAME=lr1,lr2,... with NAME in {list(names)}, got '
        f'{item!r}.'
      )
    grid[name] = tuple(float(v) for v in values.split(','))
  return grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split('\n')[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument('--task', choices=tuple(TASKS), default='convnet')
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
    help=f'rows to train (default: {",".join(DEFAULT_OPTIMIZERS)}); with '
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


def _use_mesh(args: argparse.Namespace) -> tuple[int, ...] | None:
  """Parses --mesh and, on a CPU, emulates its devices (before any JAX op)."""
  if args.mesh is None:
    return None
  if args.task != 'transformer':
    raise SystemExit('--mesh is for --task transformer.')
  try:
    shape = tuple(int(v) for v in args.mesh.split(','))
  except ValueError:
    shape = ()
  if len(shape) != 2 or min(shape) < 1:
    raise SystemExit(f'--mesh takes DATA,FSDP, e.g. 2,4; got {args.mesh!r}.')
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return shape  # the user's own emulated device count
  try:  # only the CPU backend reads it; GPUs and TPUs are real devices
    jax.config.update('jax_num_cpu_devices', math.prod(shape))
  except RuntimeError:  # JAX already started (compare.main in a program)
    print(
      f'--mesh: JAX is already running, so its {jax.device_count()} devices '
      'are used as they are.'
    )
  return shape


def load_config(path: str | os.PathLike) -> Any:
  """`get_config()` of a config file."""
  spec = importlib.util.spec_from_file_location('config_file', path)
  if spec is None or not pathlib.Path(path).is_file():
    raise SystemExit(f'--config {str(path)!r} is not a file.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def task_config(args: argparse.Namespace) -> Any:
  """The task's config file with the command line's changes."""
  name = 'default' if args.data is not None else 'tiny'
  config = load_config(
    args.config or HERE / args.task / 'configs' / f'{name}.py'
  )
  budget = TASKS[args.task].budget
  changes: dict[str, Any] = {}
  if args.data is not None:
    changes['data'] = args.data
  if args.epochs is not None:
    if budget != 'epochs':
      raise SystemExit(
        f'--epochs is for convnet and resnet; use --steps for {args.task}.'
      )
    changes['epochs'] = args.epochs
  if args.steps is not None:
    if budget != 'steps':
      raise SystemExit(
        f'--steps is for transformer and diffusion; use --epochs for '
        f'{args.task}.'
      )
    changes['steps'] = args.steps
  if args.train_size is not None:
    if not hasattr(config, 'train_size'):
      raise SystemExit(f'--train-size is for image tasks, not {args.task}.')
    changes['train_size'] = args.train_size
  if args.batch_size is not None:
    changes['batch_size'] = args.batch_size
  if args.cache_dir is not None and hasattr(config, 'cache_dir'):
    changes['cache_dir'] = args.cache_dir
  if args.mesh is not None:
    changes['mesh'] = _use_mesh(args)
  for item in args.set:
    field = item.partition('=')[0]
    if field == 'mesh':
      raise SystemExit('Use --mesh DATA,FSDP rather than --set mesh=...')
    if field in _HARNESS_FIELDS:
      raise SystemExit(
        f'--set {field}: the harness sets {_HARNESS_FIELDS} per run; use '
        '--optimizers, --variant, --lr-grid and --seeds.'
      )
  config = config.replace(**changes)
  try:
    return config.override(args.set)
  except ValueError as e:
    raise SystemExit(f'--set: {e}') from None


def scale_budget(config: Any, task: Task, fraction: float) -> Any:
  """The same schedule shape on `fraction` of the budget."""
  if task.budget == 'epochs':
    return config.replace(epochs=config.epochs * fraction)
  steps = max(1, round(config.steps * fraction))
  return config.replace(steps=steps, eval_every=min(config.eval_every, steps))


def _mean_curve(runs: list[dict[str, Any]], key: str) -> np.ndarray:
  n = min(len(r['history']) for r in runs)
  return np.array([[r['history'][i][key] for i in range(n)] for r in runs])


def to_reach(
  runs: list[dict[str, Any]], metric: str, higher: bool, target: float
) -> dict[str, float] | None:
  """The first evaluation where the seed-mean `metric` reaches `target`."""
  curve = _mean_curve(runs, metric).mean(0)
  for i, v in enumerate(curve):
    if (v >= target) if higher else (v <= target):
      h = runs[0]['history'][i]
      return {'step': h['step'], 'epoch': h['epoch']}
  return None


def _by_row(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
  rows: dict[str, list[dict[str, Any]]] = {}
  for r in results['runs']:
    rows.setdefault(r['name'], []).append(r)
  return rows


def _final_key(runs: list[dict[str, Any]], task: Task) -> str:
  if all(task.final_metric in r['final'] for r in runs):
    return task.final_metric
  return task.metric  # image data with test_size=0: no test split


def analyze(results: dict[str, Any]) -> dict[str, Any]:
  """The summary's figures: per row the final metric (mean, std), step time
  and its ratio to AdamW's; for each muon row, where its seed-mean
  validation curve first reaches each baseline's final mean."""
  task = TASKS[results['task']]
  rows = _by_row(results)
  final_key = _final_key(results['runs'], task)
  unit = 'epoch' if task.budget == 'epochs' else 'step'
  adamw_ms = None
  if 'adamw' in rows:
    adamw_ms = float(np.mean([r['step_time'] for r in rows['adamw']]))
  table = {}
  for name, runs in rows.items():
    finals = np.array([r['final'][final_key] for r in runs])
    vals = np.array([r['history'][-1][task.metric] for r in runs])
    ms = float(np.mean([r['step_time'] for r in runs]))
    table[name] = {
      'optimizer': runs[0]['optimizer'],
      'learning_rate': runs[0]['learning_rate'],
      'seeds': len(runs),
      final_key: [float(finals.mean()), float(finals.std())],
      task.metric: [float(vals.mean()), float(vals.std())],
      'step_time': ms,
      'step_time_vs_adamw': ms / adamw_ms if adamw_ms else None,
    }
  reach = {}
  for name, runs in rows.items():
    if runs[0]['optimizer'] not in OURS:
      continue
    reach[name] = {}
    for base in (*BASELINES, 'muon'):
      if base not in rows or base == name:
        continue
      target = table[base][task.metric][0]
      hit = to_reach(runs, task.metric, task.higher_is_better, target)
      budget = rows[base][0]['history'][-1][unit]
      reach[name][base] = {
        'target': target,
        unit: None if hit is None else hit[unit],
        'fraction': None if hit is None else hit[unit] / budget,
      }
  return {'final_key': final_key, 'unit': unit, 'table': table, 'reach': reach}


def _mean_std(mean_std: tuple[float, float], seeds: int) -> str:
  """`mean ± std`; the mean alone for one seed, which has no spread."""
  mean, std = mean_std
  return f'{mean:.4f}' if seeds == 1 else f'{mean:.4f} ± {std:.4f}'


def summarize(results: dict[str, Any]) -> str:
  """The markdown summary of a `results.json` dict."""
  task = TASKS[results['task']]
  a = analyze(results)
  final_key, unit, table = a['final_key'], a['unit'], a['table']
  counts = sorted({row['seeds'] for row in table.values()})
  uneven = len(counts) > 1  # a partial merge: the rows say how many
  if uneven:
    seeds = f'{counts[0]}–{counts[-1]} seeds (column `seeds`)'
  else:
    seeds = f'{counts[0]} seed(s)'
  lines = [
    f'# {results["task"]} on {results["data"]}',
    '',
    f'Model: {results["num_params"]:,} parameters. Budget: '
    f'{results["budget"]}. {seeds} per optimizer; each learning '
    f'rate chosen on seed {results.get("search_seed", 0)} by the final '
    f'validation `{task.metric}` after '
    f'{results.get("tune_budget", 1.0):g}× the budget; `{final_key}` is '
    'measured once, at the end. Step times are per run, one run after '
    'another (training steps only); under shared load, `--step-times` '
    'interleaves the optimizers for a fairer ratio.',
    '',
  ]
  cols = [
    'optimizer',
    'lr',
    *(['seeds'] if uneven else []),
    f'{final_key} (mean ± std)',
    f'final {task.metric} (mean ± std)',
    'ms / step',
    "× AdamW's ms / step",
  ]
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, row in table.items():
    ratio = row['step_time_vs_adamw']
    cells = [
      name,
      f'{row["learning_rate"]:g}',
      *([str(row['seeds'])] if uneven else []),
      _mean_std(row[final_key], row['seeds']),
      _mean_std(row[task.metric], row['seeds']),
      f'{1e3 * row["step_time"]:.0f}',
      '—' if ratio is None else f'{ratio:.2f}',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if any(a['reach'].values()):
    bases = [
      b
      for b in (*BASELINES, 'muon')
      if any(b in hits for hits in a['reach'].values())
    ]
    lines += [
      '',
      f"{unit.capitalize()}s for each Muon row's seed-mean validation "
      f"`{task.metric}` to first reach each baseline's final mean (× that "
      f"baseline's {unit}s):",
      '',
      '| | ' + ' | '.join(f"{b}'s final" for b in bases) + ' |',
      '|' + '---|' * (len(bases) + 1),
    ]
    for name, hits in a['reach'].items():
      if not hits:
        continue
      cells = [name]
      for b in bases:
        h = hits.get(b)
        if h is None:
          cells.append('—')
        elif h[unit] is None:
          cells.append(f'not reached ({h["target"]:.4f})')
        else:
          n = f'{h[unit]:.2f}' if unit == 'epoch' else f'{h[unit]}'
          cells.append(f'{n} ({h["fraction"]:.2f}×; {h["target"]:.4f})')
      lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [
    '',
    f'## Learning-rate grids (seed {results.get("search_seed", 0)}, final '
    'validation metric of the search)',
    '',
  ]
  tune_budget = results.get('tune_budget', 1.0)
  for name, grid in results['tuning'].items():
    grid = sorted(grid)
    cells = ', '.join(f'{lr:g}: {v:.4f}' for lr, v in grid)
    chosen = results['chosen_lr'][name]
    notes = []
    # A merged row whose seed-0 runs are at another budget than the others'.
    fraction = results.get('search_budget', {}).get(name, tune_budget)
    if fraction != tune_budget:
      notes.append(f'after {fraction:g}× the budget')
    if len(grid) == 1:
      notes.append('one rate: set, not searched')
    elif chosen in (grid[0][0], grid[-1][0]):
      notes.append('at the edge of the grid: widen it')
    note = f' ({"; ".join(notes)})' if notes else ''
    lines.append(f'- {name}: {cells} → **{chosen:g}**{note}')
  lines += _max_logit_lines(results)
  lines += _by_t_lines(results)
  lines += [
    '',
    f'![{task.metric} vs {unit}]({task.metric}_vs_{unit}.png)',
    f'![{task.metric} vs wall-clock]({task.metric}_vs_time.png)',
    '',
    f'Command: `{results["command"]}`',
    '',
  ]
  return '\n'.join(lines)


def _by_t_lines(results: dict[str, Any]) -> list[str]:
  """The test loss of each row at each fixed noise level (diffusion)."""
  rows = {n: _by_t(runs) for n, runs in _by_row(results).items()}
  rows = {n: v for n, v in rows.items() if v}
  if not rows:
    return []
  ts = sorted(next(iter(rows.values())))
  lines = [
    '',
    '## Test loss by noise level (mean ± std over seeds)',
    '',
    '| row | ' + ' | '.join(f't={t}' for t in ts) + ' |',
    '|' + '---|' * (len(ts) + 1),
  ]
  for name, by_t in rows.items():
    cells = [f'{by_t[t].mean():.4f} ± {by_t[t].std():.4f}' for t in ts]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines += ['', '![test loss by noise level](test_loss_by_t.png)']
  if 'samples.png' in results.get('plots', ()):
    lines += ['', '![samples](samples.png)']
  return lines


def _recorded_max_logits(runs: list[dict[str, Any]]) -> bool:
  return bool(runs) and all(
    'max_logit' in h for r in runs for h in r['history']
  )


def search_max_logits(
  searched: dict[str, list[dict[str, Any]]],
) -> dict[str, list[list[float]]]:
  """Per row, `[lr, first, peak]` of the search runs' recorded max
  logits: how fast each learning rate grows them."""
  out = {}
  for name, runs in searched.items():
    if _recorded_max_logits(runs):
      out[name] = [
        [
          r['learning_rate'],
          r['history'][0]['max_logit'],
          max(h['max_logit'] for h in r['history']),
        ]
        for r in runs
      ]
  return out


def _max_logit_lines(results: dict[str, Any]) -> list[str]:
  """A table of the largest attention logits of the rows that recorded
  them: at the first point, the peak over the run, and at the end."""
  lines = []
  for name, runs in _by_row(results).items():
    if not _recorded_max_logits(runs):
      continue
    curves = _mean_curve(runs, 'max_logit')
    cells = [
      name,
      f'{runs[0]["learning_rate"]:g}',
      *(
        f'{v.mean():.1f} ± {v.std():.1f}'
        for v in (curves[:, 0], curves.max(1), curves[:, -1])
      ),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if not lines:
    return []
  lines = [
    '',
    '## Largest attention logit (mean ± std over seeds)',
    '',
    'Each point is the largest logit of any head over the steps since the '
    'previous point.',
    '',
    '| row | lr | first point | peak | last point |',
    '|---|---|---|---|---|',
    *lines,
  ]
  searched = results.get('search_max_logits') or {}
  if searched:
    lines += [
      '',
      f'In the search (seed {results.get("search_seed", 0)}), first point → '
      'peak:',
      '',
    ]
    for name, grid in searched.items():
      cells = ', '.join(
        f'{lr:g}: {first:.1f} → {peak:.1f}' for lr, first, peak in sorted(grid)
      )
      lines.append(f'- {name}: {cells}')
  return [*lines, '', '![max logit vs step](max_logit_vs_step.png)']


def plot(results: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
  """The validation metric against epochs (or steps) and training
  wall-clock; bands span the seeds (min to max)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  task = TASKS[results['task']]
  unit = 'epoch' if task.budget == 'epochs' else 'step'
  rows = _by_row(results)
  paths = []
  for xkey, xlabel, suffix in (
    (unit, unit, unit),
    ('wall_time', 'training wall-clock (s)', 'time'),
  ):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, runs in rows.items():
      y = _mean_curve(runs, task.metric)
      x = _mean_curve(runs, xkey).mean(0)
      (line,) = ax.plot(x, y.mean(0), label=name)
      if len(runs) > 1:
        ax.fill_between(
          x, y.min(0), y.max(0), alpha=0.2, color=line.get_color()
        )
    if not task.higher_is_better:  # keep a diverged run in frame
      best = min(_mean_curve(r, task.metric).mean(0)[-1] for r in rows.values())
      ax.set_ylim(0.9 * best, 2 * best)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(task.metric)
    ax.set_title(f'{results["task"]}: {task.metric} (band: min–max over seeds)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f'{task.metric}_vs_{suffix}.png'
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  logits = plot_max_logits(results, out)
  layers = plot_layer_metrics(results, out)
  by_t = plot_loss_by_t(results, out)
  samples = plot_samples(results, out)
  return paths + [p for p in (logits, layers, by_t, samples) if p]


def _by_t(runs: list[dict[str, Any]]) -> dict[int, np.ndarray] | None:
  """{timestep: the runs' test losses there}, if every run recorded them."""
  if not runs or not all('test_loss_by_t' in r['final'] for r in runs):
    return None
  levels = runs[0]['final']['test_loss_by_t']
  return {
    int(t): np.array([r['final']['test_loss_by_t'][t] for r in runs])
    for t in levels
  }


def plot_loss_by_t(
  results: dict[str, Any], out: pathlib.Path
) -> pathlib.Path | None:
  """Each row's test loss at each fixed noise level (diffusion), as a
  ratio to AdamW's (or the first row's) at that level."""
  rows = {n: _by_t(runs) for n, runs in _by_row(results).items()}
  rows = {n: v for n, v in rows.items() if v}
  if not rows:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ref = 'adamw' if 'adamw' in rows else next(iter(rows))
  ts = sorted(rows[ref])
  base = np.array([rows[ref][t].mean() for t in ts])
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name, by_t in rows.items():
    ax.plot(ts, [by_t[t].mean() for t in ts] / base, marker='o', label=name)
  ax.set_xlabel('timestep t (noise level)')
  ax.set_ylabel(f"test loss ÷ {ref}'s at that t")
  ax.set_title(f'{results["task"]}: held-out loss by noise level (seed mean)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = out / 'test_loss_by_t.png'
  fig.savefig(path)
  plt.close(fig)
  return path


def _samples_png(run: dict[str, Any], out: pathlib.Path):
  if 'samples' not in run or 'workdir' not in run:
    return None
  for base in (pathlib.Path(run['workdir']), out / run['workdir']):
    if (base / run['samples']).is_file():
      return base / run['samples']
  return None


def plot_samples(
  results: dict[str, Any], out: pathlib.Path
) -> pathlib.Path | None:
  """The sample grids of each row's first seed, side by side (all drawn
  from the same noise)."""
  grids = {}
  for name, runs in _by_row(results).items():
    png = _samples_png(min(runs, key=lambda r: r['seed']), out)
    if png is not None:
      grids[name] = (png, min(r['seed'] for r in runs))
  if not grids:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.image as mpimg  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(
    1, len(grids), figsize=(3.2 * len(grids), 3.6), dpi=100, squeeze=False
  )
  for ax, (name, (png, seed)) in zip(axes[0], grids.items(), strict=True):
    ax.imshow(mpimg.imread(png))
    ax.set_title(f'{name} (seed {seed})', fontsize=9)
    ax.axis('off')
  fig.suptitle(f'{results["task"]}: samples from the same noise')
  fig.tight_layout()
  path = out / 'samples.png'
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_max_logits(
  results: dict[str, Any], out: pathlib.Path
) -> pathlib.Path | None:
  """The largest attention logit against steps, for the rows that
  recorded it (transformer with `record_max_logits` or `qk_clip`)."""
  rows = {
    name: runs
    for name, runs in _by_row(results).items()
    if _recorded_max_logits(runs)
  }
  if not rows:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name, runs in rows.items():
    y = _mean_curve(runs, 'max_logit')
    x = _mean_curve(runs, 'step').mean(0)
    (line,) = ax.plot(x, y.mean(0), label=name)
    if len(runs) > 1:
      ax.fill_between(x, y.min(0), y.max(0), alpha=0.2, color=line.get_color())
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_ylabel('largest attention logit since the previous point')
  ax.set_title(f'{results["task"]}: max attention logit (band: min–max)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = out / 'max_logit_vs_step.png'
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_layer_metrics(
  results: dict[str, Any], out: pathlib.Path
) -> pathlib.Path | None:
  """Per-layer update RMS ÷ weight RMS and orthogonality error of the first
  muon run recorded with --diagnostics, against step."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  run = next(
    (
      r for r in results['runs'] if r['history'] and 'layers' in r['history'][0]
    ),
    None,
  )
  if run is None:
    return None
  steps = [h['step'] for h in run['history']]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
  for ax, key, title in (
    (axes[0], 'update_to_weight_rms', 'update RMS ÷ weight RMS'),
    (axes[1], 'orthogonality_error', '‖OOᵀ − I‖_F / √k of the NS output'),
  ):
    for path in run['history'][0]['layers']:
      ys = [h['layers'][path][key] for h in run['history']]
      ax.plot(steps, ys, label=path.removesuffix('/kernel'))
    ax.set_xlabel('step')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_yscale('log')
  axes[1].legend(fontsize=6, ncol=2)
  fig.suptitle(
    f'{results["task"]}: {run["name"]} per layer (lr '
    f'{run["learning_rate"]:g}, seed {run["seed"]})'
  )
  fig.tight_layout()
  path = out / 'layer_metrics.png'
  fig.savefig(path)
  plt.close(fig)
  return path


def merge(args: argparse.Namespace) -> dict[str, Any]:
  """Results from the `runs.partial.jsonl` files of earlier invocations.

  Per row, the search is its seed-0 runs at its shortest budget (the full
  one when it was searched at the full budget); the results are its
  full-budget runs at the best learning rate of that search, one per seed.
  """
  task = TASKS[args.task]
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

  def score(r):
    v = r['history'][-1][task.metric]
    if math.isfinite(v):
      return v
    return -math.inf if task.higher_is_better else math.inf

  runs, tuning, chosen, searched, search_budget = [], {}, {}, {}, {}
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
    tuning[name], chosen[name] = list(grid.items()), best
    seeds = set()
    for r in mine:
      if r['total_steps'] == full and r['learning_rate'] == best:
        if r['seed'] not in seeds:
          seeds.add(r['seed'])
          runs.append(r)
    if not seeds:
      raise SystemExit(
        f'--merge: {name} does best at lr {best:g} in its search, but no '
        'full-budget run has that lr.'
      )
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
    'tuning': tuning,
    'search_budget': search_budget,
    'search_max_logits': search_max_logits(searched),
    'merged_from': list(args.merge),
    'command': ' '.join(['python', 'examples/compare.py', *sys.argv[1:]]),
    'runs': runs,
  }


def step_times(
  args: argparse.Namespace,
  train: Any,
  config: Any,
  rows: dict[str, tuple[str, dict]],
  grids: dict[str, tuple[float, ...]],
) -> dict[str, Any]:
  """Each row's train step, timed round-robin after two warm-up steps."""
  task = TASKS[args.task]
  batch = train.example_batch(config)
  steps, num_params = {}, None
  for name, (base, kwargs) in rows.items():
    grid = grids[name]
    cfg = _row_config(config, base, kwargs).replace(
      learning_rate=grid[len(grid) // 2]
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


def _write_step_times(result: dict[str, Any], out: pathlib.Path) -> None:
  (out / 'step_times.json').write_text(json.dumps(result, indent=1))
  lines = [
    f'# {result["task"]}: train step times',
    '',
    f'{result["num_params"]:,} parameters, batch {result["batch_size"]}; '
    f"{result['rounds']} rounds, each optimizer's step once per round "
    '(compiled and warmed up first).',
    '',
    "| optimizer | median ms | min ms | × AdamW's median |",
    '|---|---|---|---|',
  ]
  for name, ms in result['median_ms'].items():
    ratio = result['vs_adamw'].get(name)
    lines.append(
      f'| {name} | {ms:.1f} | {result["min_ms"][name]:.1f} | '
      + ('—' if ratio is None else f'{ratio:.3f}')
      + ' |'
    )
  lines += ['', f'Command: `{result["command"]}`', '']
  (out / 'step_times.md').write_text('\n'.join(lines))
  print('\n'.join(lines))


def _describe_budget(task: Task, config: Any, run: dict[str, Any]) -> str:
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


def _write(results: dict[str, Any], out: pathlib.Path) -> None:
  results['analysis'] = analyze(results)
  results['plots'] = [p.name for p in plot(results, out)]
  (out / 'results.json').write_text(json.dumps(results, indent=1))
  summary = summarize(results)
  (out / 'summary.md').write_text(summary)
  print(summary)
  print(f'Wrote {out}/summary.md, results.json and plots.')


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  task = TASKS[args.task]
  out = pathlib.Path(args.out or f'runs/{args.task}')
  out.mkdir(parents=True, exist_ok=True)
  if args.merge:
    results = merge(args)
    _write(results, out)
    return results
  if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
  train = importlib.import_module(f'{args.task}.train')
  config = task_config(args)

  names = args.optimizers
  if names is None:  # '' trains --variant rows only
    names = ','.join(DEFAULT_OPTIMIZERS)
  rows = {n: (n, {}) for n in names.split(',') if n.strip()}
  for name in rows:
    if name not in BASE_OPTIMIZERS:
      raise SystemExit(
        f'Unknown optimizer {name!r}; known: {BASE_OPTIMIZERS} (and '
        '--variant for others).'
      )
  rows.update(_parse_variants(args.variant))
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
    _row_config(config, base, kwargs)
  grids = {n: DEFAULT_GRIDS[args.task][base] for n, (base, _) in rows.items()}
  grids.update(_parse_grid(args.lr_grid, list(rows)))

  if args.step_times is not None:
    result = step_times(args, train, config, rows, grids)
    _write_step_times(result, out)
    return result

  reuse = args.tune_budget >= 1.0
  tune_config = (
    config if reuse else scale_budget(config, task, args.tune_budget)
  )
  total = sum(len(grids[n]) + args.seeds - reuse for n in rows)
  bar = tqdm.tqdm(total=total, desc='runs', disable=args.no_progress)
  partial = out / 'runs.partial.jsonl'  # one line per finished run
  partial.write_text('')

  def run(name, cfg, lr, seed, tune):
    base, kwargs = rows[name]
    cfg = _row_config(cfg, base, kwargs).replace(learning_rate=lr, seed=seed)
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

  runs, tuning, chosen, searched, routing = [], {}, {}, {}, None
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
      runs.append(best[2])
    first = args.first_seed + (1 if reuse else 0)  # reuse: already run
    for seed in range(first, args.first_seed + args.seeds):
      runs.append(run(name, config, best[0], seed, tune=False))
  bar.close()
  if routing:
    (out / 'routing.txt').write_text(routing + '\n')

  results = {
    'task': args.task,
    'data': config.data or task.embedded,
    'budget': _describe_budget(task, config, runs[0]),
    'num_params': runs[0]['num_params'],
    'config': dataclasses.asdict(config),
    'tune_budget': args.tune_budget,
    'search_seed': args.first_seed,
    'rows': {n: {'optimizer': b, 'kwargs': k} for n, (b, k) in rows.items()},
    'grids': {n: list(grids[n]) for n in rows},
    'chosen_lr': chosen,
    'tuning': tuning,
    'search_max_logits': search_max_logits(searched),
    'command': ' '.join(
      [
        'python',
        'examples/compare.py',
        *(sys.argv[1:] if argv is None else argv),
      ]
    ),
    'total_seconds': time.time() - t0,
    'runs': runs,
  }
  _write(results, out)
  return results


if __name__ == '__main__':
  main()
