"""The tasks the harness compares optimizers on, and their configs.

A task is one of the examples (`convnet`, `resnet`, `transformer`,
`diffusion`): its metric, its budget's unit, its learning-rate grids. A row
is an optimizer, or a `--variant` of one, with its keyword arguments and its
own config fields; `row_config` builds the config one run of it trains with.
"""

import argparse
import ast
from collections.abc import Sequence
import dataclasses
import importlib.util
import math
import os
import pathlib
from typing import Any

import jax
import ml_collections

HERE = pathlib.Path(__file__).resolve().parents[1]  # examples/


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
HARNESS_FIELDS = ('optimizer', 'optimizer_kwargs', 'learning_rate', 'seed')


def literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_variants(items: Sequence[str]) -> dict[str, tuple[str, dict]]:
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
      kwargs[key] = literal(value)
    variants[name] = (base, kwargs)
  return variants


def row_config(config: Any, base: str, kwargs: dict[str, Any]) -> Any:
  """`config` set up for one row: its optimizer, the optimizer's keyword
  arguments, and the row's own `config.FIELD` values."""
  fields = {
    k.removeprefix('config.'): v
    for k, v in kwargs.items()
    if k.startswith('config.')
  }
  allowed = set(config.keys()) - set(HARNESS_FIELDS)
  for field in fields:
    if field not in allowed:
      raise SystemExit(
        f'--variant: a row may set config.FIELD with FIELD one of '
        f'{sorted(allowed)}, got config.{field}.'
      )
  optimizer_kwargs = {
    k: v for k, v in kwargs.items() if not k.startswith('config.')
  }
  return with_changes(
    config, optimizer=base, optimizer_kwargs=optimizer_kwargs, **fields
  )


def parse_grid(
  items: Sequence[str],
  names: Sequence[str],
  flag: str = '--lr-grid',
  one: bool = False,
) -> dict[str, tuple[float, ...]]:
  """`NAME=lr1,lr2,...` items (`NAME=LR` if `one`) as {NAME: rates}."""
  grid = {}
  for item in items:
    name, _, values = item.partition('=')
    try:
      rates = tuple(float(v) for v in values.split(','))
    except ValueError:
      rates = ()
    if name not in names or not rates or (one and len(rates) > 1):
      raise SystemExit(
        f'{flag} takes NAME={"LR" if one else "lr1,lr2,..."} with NAME in '
        f'{list(names)}, got {item!r}.'
      )
    grid[name] = rates
  return grid


def use_mesh(args: argparse.Namespace) -> tuple[int, ...] | None:
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
    changes['mesh'] = use_mesh(args)
  for item in args.set:
    field = item.partition('=')[0]
    if field == 'mesh':
      raise SystemExit('Use --mesh DATA,FSDP rather than --set mesh=...')
    if field in HARNESS_FIELDS:
      raise SystemExit(
        f'--set {field}: the harness sets {HARNESS_FIELDS} per run; use '
        '--optimizers, --variant, --lr-grid and --seeds.'
      )
  config = with_changes(config, **changes)
  try:
    return with_changes(config, **dict(parse_assignment(a) for a in args.set))
  except (KeyError, TypeError, ValueError) as e:
    raise SystemExit(f'--set: {e}') from None


def scale_budget(config: Any, task: Task, fraction: float) -> Any:
  """The same schedule shape on `fraction` of the budget."""
  if task.budget == 'epochs':
    return with_changes(config, epochs=config.epochs * fraction)
  steps = max(1, round(config.steps * fraction))
  return with_changes(
    config, steps=steps, eval_every=min(config.eval_every, steps)
  )


def with_changes(
  config: ml_collections.ConfigDict, **changes: Any
) -> ml_collections.ConfigDict:
  """A copy of `config` with these fields set (each must exist; a field's
  type is checked by the ConfigDict)."""
  out = config.copy_and_resolve_references()
  for name, value in changes.items():
    if name not in out:
      raise KeyError(
        f'{name!r} is no field of the config; the fields are '
        f'{sorted(out.keys())}.'
      )
    setattr(out, name, value)
  return out


def parse_assignment(item: str) -> tuple[str, Any]:
  """`FIELD=VALUE` with VALUE read as a Python literal (a string if it is
  none): `widths=16,32,64`, `train_size=None`, `optimizer=muon`."""
  name, sep, text = item.partition('=')
  if not sep or not name:
    raise ValueError(f'expected FIELD=VALUE, got {item!r}')
  return name, literal(text)
