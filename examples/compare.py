r"""Muon vs AdamW vs SGD-Nesterov vs optax.contrib.muon, in one command.

  python examples/compare.py --task {convnet,transformer} [--data PATH]
      [--optimizers muon,adamw,sgd,optax_muon] [--seeds N]
      [--epochs E | --steps S] [--train-size N] [--lr-grid ...] [--out DIR]
      [--mesh DATA,FSDP]

For each optimizer: one seed-0 run per learning rate of its grid, judged on
the validation split (carved from the training data; a test split is never
looked at for this); then the other seeds at the chosen learning rate. Every
run has the same budget and the same schedule shape (linear warm-up, linear
decay). Writes DIR/summary.md, DIR/results.json and DIR/*.png.

With no arguments: the ConvNet on scikit-learn's bundled digits, about a
minute on two CPU cores.
"""

import argparse
from collections.abc import Sequence
import dataclasses
import importlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
import optimizers
import tqdm

TASKS = ('convnet', 'transformer')

#: Peak learning-rate grids (Muon's own for `muon`; its Adam part follows
#: through `MuonConfig.adam_lr_ratio`).
DEFAULT_GRIDS = {
  'convnet': {
    'muon': (0.05, 0.1, 0.2),
    'adamw': (1e-3, 3e-3, 1e-2),
    'sgd': (0.05, 0.1, 0.2),
    'optax_muon': (1e-3, 3e-3, 1e-2),
  },
  'transformer': {
    'muon': (3e-3, 1e-2, 3e-2),
    'adamw': (3e-3, 1e-2, 3e-2),
    'sgd': (0.1, 0.3, 1.0),
    'optax_muon': (3e-3, 1e-2, 3e-2),
  },
}


def _parse_grid(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
  grid = {}
  for item in items:
    name, sep, values = item.partition('=')
    if not sep or name not in optimizers.OPTIMIZERS:
      raise SystemExit(
        f'--lr-grid takes NAME=lr1,lr2,... with NAME in '
        f'{list(optimizers.OPTIMIZERS)}, got {item!r}.'
      )
    grid[name] = tuple(float(v) for v in values.split(','))
  return grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split('\n')[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument('--task', choices=TASKS, default='convnet')
  p.add_argument(
    '--data',
    default=None,
    help='convnet: a folder with train/ (and test/) class folders or '
    'train.tar.gz/test.tar.gz, or cifar-10-batches-py/; transformer: a text '
    'file. Default: an embedded dataset that needs no download.',
  )
  p.add_argument('--optimizers', default=','.join(optimizers.OPTIMIZERS))
  p.add_argument('--seeds', type=int, default=2)
  budget = p.add_mutually_exclusive_group()
  budget.add_argument('--epochs', type=float, default=None)
  budget.add_argument('--steps', type=int, default=None)
  p.add_argument('--train-size', type=int, default=None)
  p.add_argument(
    '--lr-grid',
    nargs='+',
    default=[],
    metavar='NAME=LR,...',
    help='e.g. --lr-grid muon=0.05,0.1 adamw=3e-3 (others keep the default).',
  )
  p.add_argument(
    '--tune-budget',
    type=float,
    default=1.0,
    help='fraction of the budget (same schedule shape, compressed) for the '
    'learning-rate search; at 1.0 the chosen seed-0 run is reused.',
  )
  p.add_argument('--out', default=None, help='default: runs/<task>')
  p.add_argument('--batch-size', type=int, default=None)
  p.add_argument(
    '--size',
    choices=('tiny', 'small'),
    default=None,
    help='model and evaluation size; default tiny on the embedded data, '
    'small with --data.',
  )
  p.add_argument(
    '--set',
    nargs='+',
    default=[],
    metavar='FIELD=VALUE',
    help='any other field of the task Config, e.g. eval_every=25 '
    'widths=16,32,64.',
  )
  p.add_argument('--cache-dir', default=None)
  p.add_argument('--muon-scaling', choices=('rms', 'jordan'), default=None)
  p.add_argument('--muon-adam-ratio', type=float, default=None)
  p.add_argument('--muon-beta', type=float, default=None)
  p.add_argument(
    '--muon-override',
    nargs='+',
    default=[],
    metavar='PATTERN=LABEL',
    help="routing overrides for muon, e.g. stem=adam 'head=muon'.",
  )
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
    help="record Muon's per-layer orthogonality error and update/weight RMS "
    "and plot them (layer_metrics.png); adds its cost to muon's step time.",
  )
  p.add_argument(
    '--mesh',
    default=None,
    metavar='DATA,FSDP',
    help='transformer: train data-parallel + FSDP on a (data, fsdp) device '
    'mesh, e.g. 2,4 (batches over all devices, parameters and optimizer '
    'state sharded over fsdp). On a CPU the devices are emulated.',
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


def _task_config(task_train: Any, args: argparse.Namespace) -> Any:
  size = args.size or ('tiny' if args.data is None else 'small')
  config = task_train.tiny_config() if size == 'tiny' else task_train.Config()
  changes = {}
  if args.epochs is not None:
    if not hasattr(config, 'epochs'):
      raise SystemExit(
        f'--epochs is for the convnet; use --steps for {args.task}.'
      )
    changes['epochs'] = args.epochs
  if args.steps is not None:
    changes['steps'] = args.steps
  if args.train_size is not None:
    changes['train_size'] = args.train_size
  if args.batch_size is not None:
    changes['batch_size'] = args.batch_size
  if args.mesh is not None:
    changes['mesh'] = _use_mesh(args)
  fields = {f.name: f for f in dataclasses.fields(config)}
  for item in args.set:
    name, sep, value = item.partition('=')
    if not sep or name not in fields:
      raise SystemExit(
        f'--set takes FIELD=VALUE with FIELD in {list(fields)}, got {item!r}.'
      )
    if name == 'mesh':
      raise SystemExit('Use --mesh DATA,FSDP rather than --set mesh=...')
    current = getattr(config, name)
    if isinstance(current, tuple):
      changes[name] = tuple(int(v) for v in value.split(','))
    elif isinstance(current, bool):
      changes[name] = value.lower() in ('1', 'true', 'yes')
    elif isinstance(current, float):
      changes[name] = float(value)
    else:
      changes[name] = int(value)
  return dataclasses.replace(config, **changes)


def _muon_config(task_train: Any, args: argparse.Namespace):
  config = task_train.default_muon_config()
  changes = {}
  if args.muon_scaling:
    changes['scaling'] = args.muon_scaling
  if args.muon_adam_ratio is not None:
    changes['adam_lr_ratio'] = args.muon_adam_ratio
  if args.muon_beta is not None:
    changes['beta'] = args.muon_beta
  if args.muon_override:
    pairs = []
    for item in args.muon_override:
      pattern, sep, label = item.partition('=')
      if not sep or label not in ('muon', 'adam'):
        raise SystemExit(
          f'--muon-override takes PATTERN=muon|adam, got {item!r}.'
        )
      pairs.append((pattern, label))
    changes['overrides'] = tuple(pairs)
  if args.diagnostics:
    changes['diagnostics'] = True
  return dataclasses.replace(config, **changes)


def _better(a: float, b: float, higher: bool) -> bool:
  return a > b if higher else a < b


def _mean_curve(runs: list[dict[str, Any]], key: str) -> np.ndarray:
  n = min(len(r['history']) for r in runs)
  return np.array([[r['history'][i][key] for i in range(n)] for r in runs])


def _steps_to(runs, metric, higher, target):
  """First history point where the seed-mean `metric` reaches `target`."""
  curve = _mean_curve(runs, metric).mean(0)
  for i, v in enumerate(curve):
    if (v >= target) if higher else (v <= target):
      h = runs[0]['history'][i]
      return h['step'], h['epoch']
  return None


def summarize(results: dict[str, Any]) -> str:
  """The markdown summary of a `results.json` dict."""
  metric, higher = results['metric'], results['higher_is_better']
  final_key = results['final_metric']
  by_opt: dict[str, list[dict[str, Any]]] = {}
  for r in results['runs']:
    by_opt.setdefault(r['optimizer'], []).append(r)
  lines = [
    f'# {results["task"]} on {results["data"]}',
    '',
    f'{len(next(iter(by_opt.values())))} seed(s) per optimizer; learning '
    f'rate chosen on seed 0 by final `{metric}` after '
    f'{results.get("tune_budget", 1.0):g}× the budget. Budget: '
    f'{results["budget"]}.',
    '',
  ]
  target = None
  if 'adamw' in by_opt:
    target = float(np.mean([r['history'][-1][metric] for r in by_opt['adamw']]))
    adam_steps = by_opt['adamw'][0]['total_steps']
    lines.append(
      f'Target for "to reach AdamW": AdamW\'s final mean `{metric}` = '
      f'{target:.4f}.'
    )
    lines.append('')
  both = final_key != metric
  cols = ['optimizer', 'lr', f'{final_key} (mean ± std)']
  if both:
    cols.append(f'final {metric} (mean ± std)')
  cols += ["steps (epochs) to AdamW's final", "× AdamW's budget", 'ms / step']
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, runs in by_opt.items():
    finals = np.array([r['final'][final_key] for r in runs])
    vals = np.array([r['history'][-1][metric] for r in runs])
    reach, ratio = 'n/a', 'n/a'
    if target is not None:
      hit = _steps_to(runs, metric, higher, target)
      if hit is None:
        reach, ratio = 'not reached', '—'
      else:
        reach = f'{hit[0]} ({hit[1]:.2f})'
        ratio = f'{hit[0] / adam_steps:.2f}'
    ms = 1e3 * float(np.mean([r['step_time'] for r in runs]))
    cells = [name, f'{runs[0]["learning_rate"]:g}']
    cells.append(f'{finals.mean():.4f} ± {finals.std():.4f}')
    if both:
      cells.append(f'{vals.mean():.4f} ± {vals.std():.4f}')
    cells += [reach, ratio, f'{ms:.0f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [
    '',
    '## Learning-rate grids (seed 0, validation metric at the end of tuning)',
    '',
  ]
  for name, grid in results['tuning'].items():
    cells = ', '.join(f'{lr:g}: {v:.4f}' for lr, v in grid)
    chosen = results['chosen_lr'][name]
    lines.append(f'- {name}: {cells} → **{chosen:g}**')
  lines += [
    '',
    f'![{metric} vs step]({metric}_vs_step.png)',
    f'![{metric} vs wall-clock]({metric}_vs_time.png)',
    '',
  ]
  return '\n'.join(lines)


def plot(results: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
  """`metric` against step and against wall-clock, seed bands (min–max)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metric = results['metric']
  by_opt: dict[str, list[dict[str, Any]]] = {}
  for r in results['runs']:
    by_opt.setdefault(r['optimizer'], []).append(r)
  paths = []
  for xkey, xlabel, suffix in (
    ('step', 'step', 'step'),
    ('wall_time', 'training wall-clock (s)', 'time'),
  ):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, runs in by_opt.items():
      y = _mean_curve(runs, metric)
      x = _mean_curve(runs, xkey).mean(0)
      (line,) = ax.plot(x, y.mean(0), label=name)
      if len(runs) > 1:
        ax.fill_between(
          x, y.min(0), y.max(0), alpha=0.2, color=line.get_color()
        )
    if not results['higher_is_better']:  # keep a diverged run in frame
      best = min(_mean_curve(r, metric).mean(0)[-1] for r in by_opt.values())
      ax.set_ylim(0.9 * best, 2 * best)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(f'{results["task"]}: {metric} (band: min–max over seeds)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f'{metric}_vs_{suffix}.png'
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  layers = plot_layer_metrics(results, out)
  return paths + ([layers] if layers else [])


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
    f'{results["task"]}: muon per layer (lr {run["learning_rate"]:g}, '
    f'seed {run["seed"]})'
  )
  fig.tight_layout()
  path = out / 'layer_metrics.png'
  fig.savefig(path)
  plt.close(fig)
  return path


def _log_run(run: dict[str, Any], metric: str, path: pathlib.Path) -> None:
  tqdm.tqdm.write(
    f'  {run["optimizer"]} lr={run["learning_rate"]:g} seed={run["seed"]}: '
    f'{metric} {run["history"][-1][metric]:.4f}, '
    f'{1e3 * run["step_time"]:.0f} ms/step'
  )
  with path.open('a') as f:
    f.write(json.dumps(run) + '\n')


def merge(args: argparse.Namespace, task_train: Any) -> dict[str, Any]:
  """Results from the `runs.partial.jsonl` files of earlier invocations."""
  metric, higher = task_train.METRIC, task_train.HIGHER_IS_BETTER
  lines = []
  for d in args.merge:
    path = pathlib.Path(d) / 'runs.partial.jsonl'
    lines += [json.loads(x) for x in path.read_text().splitlines() if x]
  full = max(r['total_steps'] for r in lines)

  def score(r):
    v = r['history'][-1][metric]
    return v if math.isfinite(v) else (-math.inf if higher else math.inf)

  order = {n: i for i, n in enumerate(optimizers.OPTIMIZERS)}
  names = sorted({r['optimizer'] for r in lines}, key=order.get)
  runs, tuning, chosen = [], {}, {}
  for name in names:
    mine = [r for r in lines if r['optimizer'] == name]
    # The search: seed-0 runs at this optimizer's shortest budget (the full
    # one when it was tuned at the full budget), one per learning rate.
    budget = min(r['total_steps'] for r in mine)
    grid: dict[float, float] = {}
    for r in mine:
      if r['seed'] == 0 and r['total_steps'] == budget:
        grid.setdefault(r['learning_rate'], score(r))
    if not grid:
      raise SystemExit(f'--merge: no seed-0 run of {name} to choose from.')
    best = max(grid, key=grid.get) if higher else min(grid, key=grid.get)
    tuning[name], chosen[name] = list(grid.items()), best
    seeds = set()
    for r in mine:  # the results: every seed at the full budget and best lr
      if r['total_steps'] == full and r['learning_rate'] == best:
        if r['seed'] not in seeds:
          seeds.add(r['seed'])
          runs.append(r)
    if not seeds:
      raise SystemExit(
        f'--merge: {name} does best at lr {best:g} in its search, but no '
        'full-budget run has that lr.'
      )
  runs.sort(key=lambda r: (order[r['optimizer']], r['seed']))
  last = runs[0]['history'][-1]
  final_key = next(iter(runs[0]['final']))
  if all('test_accuracy' in r['final'] for r in runs):
    final_key = 'test_accuracy'  # as in a fresh run: test when there is one
  results = {
    'task': args.task,
    'data': args.data or task_train.EMBEDDED_DATA,
    'metric': metric,
    'higher_is_better': higher,
    'final_metric': final_key,
    'budget': f'{full} steps ({last["epoch"]:.2f} epochs)',
    'tune_budget': min(
      [r['total_steps'] / full for r in lines if r['total_steps'] < full],
      default=1.0,
    ),
    'chosen_lr': chosen,
    'tuning': {n: tuning[n] for n in chosen},
    'merged_from': list(args.merge),
    'command': ' '.join(['python', 'examples/compare.py', *sys.argv[1:]]),
    'runs': runs,
  }
  return results


def _write(results: dict[str, Any], out: pathlib.Path) -> None:
  (out / 'results.json').write_text(json.dumps(results, indent=1))
  plot(results, out)
  summary = summarize(results)
  (out / 'summary.md').write_text(summary)
  print(summary)
  print(f'Wrote {out}/summary.md, results.json and plots.')


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  task_train = importlib.import_module(f'{args.task}.train')
  if args.merge:
    out = pathlib.Path(args.out or f'runs/{args.task}')
    out.mkdir(parents=True, exist_ok=True)
    results = merge(args, task_train)
    _write(results, out)
    return results
  names = [n.strip() for n in args.optimizers.split(',') if n.strip()]
  for n in names:
    if n not in optimizers.OPTIMIZERS:
      raise SystemExit(
        f'Unknown optimizer {n!r}; known: {optimizers.OPTIMIZERS}.'
      )
  if args.seeds < 1:
    raise SystemExit(f'--seeds must be at least 1, got {args.seeds}.')
  grids = {**DEFAULT_GRIDS[args.task], **_parse_grid(args.lr_grid)}
  config = _task_config(task_train, args)
  muon_config = _muon_config(task_train, args)
  out = pathlib.Path(args.out or f'runs/{args.task}')
  out.mkdir(parents=True, exist_ok=True)
  dataset = task_train.load_data(args.data, config, cache_dir=args.cache_dir)
  metric, higher = task_train.METRIC, task_train.HIGHER_IS_BETTER
  if 'muon' in names:
    table = task_train.routing_table(config, dataset, muon_config)
    (out / 'routing.txt').write_text(table + '\n')
    print(f'muon routing ({out}/routing.txt):\n{table}')

  reuse = args.tune_budget >= 1.0
  tune_config = config
  if not reuse:
    tune_config = task_train.scale_budget(config, args.tune_budget)
  total = sum(len(grids[n]) + args.seeds - reuse for n in names)
  disable = args.no_progress
  outer = tqdm.tqdm(total=total, desc='runs', disable=disable, position=0)

  def inner(**kw):
    return tqdm.tqdm(leave=False, disable=disable, position=1, **kw)

  runs, tuning, chosen = [], {}, {}
  t0 = time.time()
  partial = out / 'runs.partial.jsonl'  # one line per finished run
  partial.write_text('')
  for name in names:
    scores, best = [], None
    for lr in grids[name]:
      r = task_train.train_and_evaluate(
        tune_config,
        dataset,
        optimizer=name,
        learning_rate=lr,
        seed=0,
        muon_config=muon_config,
        progress=inner,
      )
      _log_run(r, metric, partial)
      score = r['history'][-1][metric]
      if not math.isfinite(score):
        score = -math.inf if higher else math.inf
      scores.append((lr, score))
      if best is None or _better(score, best[1], higher):
        best = (r, score)
      outer.update()
    tuning[name], chosen[name] = scores, best[0]['learning_rate']
    tqdm.tqdm.write(
      f'{name}: lr {chosen[name]:g} ({metric} {best[1]:.4f} on seed 0)'
    )
    first_seed = 1 if reuse else 0
    if reuse:
      runs.append(best[0])
    for seed in range(first_seed, args.seeds):
      r = task_train.train_and_evaluate(
        config,
        dataset,
        optimizer=name,
        learning_rate=chosen[name],
        seed=seed,
        muon_config=muon_config,
        progress=inner,
      )
      _log_run(r, metric, partial)
      runs.append(r)
      outer.update()
  outer.close()

  final_metric = task_train.final_metric(dataset)
  results = {
    'task': args.task,
    'data': args.data or task_train.EMBEDDED_DATA,
    'metric': metric,
    'higher_is_better': higher,
    'final_metric': final_metric,
    'budget': task_train.describe_budget(config, runs[0]),
    'config': dataclasses.asdict(config),
    'tune_budget': args.tune_budget,
    'muon_config': dataclasses.asdict(muon_config),
    'grids': {n: list(grids[n]) for n in names},
    'chosen_lr': chosen,
    'tuning': tuning,
    'command': ' '.join(['python', 'examples/compare.py', *sys.argv[1:]])
    if argv is None
    else ' '.join(['python', 'examples/compare.py', *argv]),
    'total_seconds': time.time() - t0,
    'runs': runs,
  }
  _write(results, out)
  return results


if __name__ == '__main__':
  main()
