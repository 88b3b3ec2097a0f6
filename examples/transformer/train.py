"""Trains and evaluates the byte-level Transformer (Flax NNX)."""

import contextlib
import functools
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import muon_optax
from transformer import input_pipeline
from transformer import models

OPTIMIZERS = ('muon', 'adamw', 'nadamw', 'sgd', 'optax_muon', 'normuon')


def create_learning_rate_schedule(
  learning_rate: jax.typing.ArrayLike, total_steps: int, warmup_fraction: float
) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then linear decay to 0."""
  warmup = max(1, round(warmup_fraction * total_steps))
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, learning_rate, warmup),
      optax.linear_schedule(learning_rate, 0.0, max(1, total_steps - warmup)),
    ],
    [warmup],
  )


def muon_routing(config: ml_collections.ConfigDict, model: nnx.Module) -> Any:
  """`param_labels` of the `muon` and `normuon` rows: the model itself (the
  library's routing of its layer types), or with `config.head_names` that
  routing with those head patterns."""
  if config.head_names is None:
    return model
  return muon_optax.route(model, head_names=config.head_names)


def create_optimizer(
  config: ml_collections.ConfigDict, model: nnx.Module, total_steps: int
) -> optax.GradientTransformation:
  """`config.optimizer` with its defaults and the shared schedule.

  The peak learning rate is a hyperparameter in the optimizer state
  (`optax.inject_hyperparams`), so one compiled train step serves every
  learning rate: set it with `set_learning_rate`. No weight decay anywhere.
  """
  name, kwargs = config.optimizer, dict(config.optimizer_kwargs)
  if config.head_names is not None and name not in ('muon', 'normuon'):
    raise ValueError(
      f'`head_names` routes `muon` and `normuon`; `optimizer` is {name!r}.'
    )
  labels = muon_routing(config, model)

  def make(learning_rate):
    schedule = create_learning_rate_schedule(
      learning_rate, total_steps, config.warmup_fraction
    )
    if name == 'muon':  # routing from the model: embeddings, head to Adam
      return muon_optax.muon(schedule, param_labels=labels, **kwargs)
    if name == 'normuon':  # muon + NorMuon's per-neuron normalization
      return muon_optax.normuon(schedule, param_labels=labels, **kwargs)
    if name == 'adamw':
      return optax.adamw(schedule, **{'weight_decay': 0.0, **kwargs})
    if name == 'nadamw':
      return optax.adamw(
        schedule, **{'weight_decay': 0.0, 'nesterov': True, **kwargs}
      )
    if name == 'sgd':
      return optax.sgd(
        schedule, **{'momentum': 0.9, 'nesterov': True, **kwargs}
      )
    if name == 'optax_muon':
      return optax.contrib.muon(schedule, **kwargs)
    raise ValueError(
      f'`optimizer` must be one of {OPTIMIZERS}, got {config.optimizer!r}.'
    )

  def make_and_clip(learning_rate):
    tx = make(learning_rate)
    if config.qk_clip is None:
      return tx
    # Last, after the learning rate: it rescales the weights the update makes.
    return optax.chain(tx, muon_optax.qk_clip(config.qk_clip))

  make_and_clip(config.learning_rate)  # bad names and kwargs fail here
  return optax.inject_hyperparams(make_and_clip)(
    learning_rate=config.learning_rate
  )


def set_learning_rate(optimizer: nnx.Optimizer, learning_rate: float) -> None:
  """Sets the peak learning rate in `optimizer`'s state."""
  state = optax.tree_utils.tree_set(
    nnx.as_pure(optimizer.opt_state),
    learning_rate=jnp.asarray(learning_rate, jnp.float32),
  )
  nnx.update(optimizer.opt_state, nnx.state(state))


# Runs that differ only in learning rate and seed share one optimizer object,
# hence one compiled train step (the transformation is static under jit).
_OPTIMIZERS: dict[Any, optax.GradientTransformation] = {}


def _shared_optimizer(config, model, total_steps):
  key = (
    nnx.graphdef(model),
    config.optimizer,
    repr(sorted(config.optimizer_kwargs.items())),
    config.head_names,
    total_steps,
    config.warmup_fraction,
    config.mesh,
    config.qk_clip,
  )
  if key not in _OPTIMIZERS:
    _OPTIMIZERS[key] = create_optimizer(config, model, total_steps)
  return _OPTIMIZERS[key]


def create_model(config: ml_collections.ConfigDict) -> models.Transformer:
  return models.Transformer(
    input_pipeline.VOCAB_SIZE,
    config.context,
    d_model=config.d_model,
    num_layers=config.num_layers,
    num_heads=config.num_heads,
    record_max_logits=config.record_max_logits or config.qk_clip is not None,
    rngs=nnx.Rngs(config.seed),
  )


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def loss_fn(model: models.Transformer, x: jax.Array, y: jax.Array):
  if model.record_max_logits:  # the recording layers run under a capture
    logits, _ = muon_optax.capture_max_logits(model)(x)
  else:
    logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


def _loss_and_max_logits(model, x, y):
  logits, max_logits = muon_optax.capture_max_logits(model)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (
    max_logits
  )


@nnx.jit(static_argnames='clip')
def train_step_with_max_logits(model, optimizer, x, y, *, clip):
  """`train_step` that also returns the step's largest attention logit, and
  with `clip` hands every head's to the optimizer (`muon_optax.qk_clip`)."""
  (loss, max_logits), grads = nnx.value_and_grad(
    _loss_and_max_logits, has_aux=True
  )(model, x, y)
  if clip:
    optimizer.update(model, grads, max_logits=max_logits)
  else:
    optimizer.update(model, grads)
  top = jnp.max(jnp.stack([jnp.max(v) for v in max_logits.values()]))
  return loss, top


def sharded_train_step(param_shardings: Any, state_shardings: Any):
  """`train_step` that keeps parameters and optimizer state in their FSDP
  layouts (with auto mesh axes the compiler could otherwise move them)."""

  @nnx.jit
  def step(model, optimizer, x, y):
    loss = train_step(model, optimizer, x, y)
    nnx.update(
      model,
      jax.lax.with_sharding_constraint(
        nnx.as_pure(nnx.state(model, nnx.Param)), param_shardings
      ),
    )
    nnx.update(
      optimizer,
      jax.lax.with_sharding_constraint(
        nnx.as_pure(nnx.state(optimizer)), state_shardings
      ),
    )
    return loss

  return step


@nnx.jit
def eval_step(model, x, y):
  return loss_fn(model, x, y)


def evaluate(model, windows, batch_size: int) -> float:
  """Mean next-byte cross-entropy (nats) over whole batches of `windows`."""
  x, y = windows
  n = (len(x) // batch_size) * batch_size
  total = 0.0
  for i in range(0, n, batch_size):
    total += float(
      eval_step(model, x[i : i + batch_size], y[i : i + batch_size])
    )
  return total * batch_size / n


def make_mesh(shape: tuple[int, ...]) -> jax.sharding.Mesh:
  """A `('data', 'fsdp')` mesh of `shape` over all devices, auto axes."""
  shape = tuple(shape)
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f'`mesh` must be (data, fsdp), got {shape}.')
  if math.prod(shape) != jax.device_count():
    raise ValueError(
      f'`mesh` {shape} needs {math.prod(shape)} devices, there are '
      f'{jax.device_count()}. On a CPU, emulate them by setting '
      f'XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(shape)} '
      'before JAX starts.'
    )
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh(shape, ('data', 'fsdp'), axis_types=auto)


def fsdp_sharding(
  mesh: jax.sharding.Mesh, shape: tuple[int, ...]
) -> jax.sharding.NamedSharding:
  """Shards the largest axis of `shape` that `fsdp` divides; else replicates.

  Applied to the parameters and to every optimizer-state leaf alike, so a
  momentum or Adam moment lands where its parameter lives; scalars (step
  counts, the learning rate) and leaves with no such axis are replicated.
  """
  n = mesh.shape['fsdp']
  spec = [None] * len(shape)
  for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[axis] >= n and shape[axis] % n == 0:
      spec[axis] = 'fsdp'
      break
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def shard(tree: Any, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """`(tree placed in FSDP layouts, those shardings)` for a pure tree."""
  shardings = jax.tree.map(lambda x: fsdp_sharding(mesh, x.shape), tree)
  return jax.device_put(tree, shardings), shardings


def layouts(state: Any) -> dict[str, list[str | None]]:
  """Each leaf's partition spec (one entry per axis), by path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.as_pure(state))
  return {
    jax.tree_util.keystr(k, simple=True, separator='/'): [
      *x.sharding.spec,
      *[None] * (x.ndim - len(x.sharding.spec)),
    ]
    for k, x in flat
  }


def in_fsdp_layouts(state: Any, mesh: jax.sharding.Mesh) -> bool:
  """Whether every leaf of `state` lies as `fsdp_sharding` places it."""
  return all(
    x.sharding.is_equivalent_to(fsdp_sharding(mesh, x.shape), x.ndim)
    for x in jax.tree.leaves(nnx.as_pure(state))
  )


def create_train_state(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> tuple[models.Transformer, nnx.Optimizer, Any]:
  """`(model, optimizer, step)`, `step(x, y)` training on one batch.

  With a mesh (and under `jax.set_mesh(mesh)`), the parameters and every
  optimizer-state leaf are placed in FSDP layouts (`fsdp_sharding`), the
  step splits each batch over all devices and keeps those layouts.
  """
  model = create_model(config)
  tx = _shared_optimizer(config, model, config.steps)
  recording = config.record_max_logits or config.qk_clip is not None
  if recording and mesh is not None:
    raise ValueError(
      '`qk_clip` and `record_max_logits` run on one device in this example; '
      'unset `mesh`.'
    )
  if mesh is None:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    set_learning_rate(optimizer, config.learning_rate)
    if recording:
      step = functools.partial(
        train_step_with_max_logits, clip=config.qk_clip is not None
      )
      return model, optimizer, nnx.cached_partial(step, model, optimizer)
    return model, optimizer, nnx.cached_partial(train_step, model, optimizer)
  params, param_shardings = shard(
    nnx.as_pure(nnx.state(model, nnx.Param)), mesh
  )
  nnx.update(model, params)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  set_learning_rate(optimizer, config.learning_rate)
  opt_state, state_shardings = shard(nnx.as_pure(nnx.state(optimizer)), mesh)
  nnx.update(optimizer, opt_state)
  step = nnx.cached_partial(
    sharded_train_step(param_shardings, state_shardings), model, optimizer
  )
  batch_sharding = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(('data', 'fsdp'))
  )
  return (
    model,
    optimizer,
    lambda x, y: step(*jax.device_put((x, y), batch_sharding)),
  )


def example_batch(config: ml_collections.ConfigDict) -> tuple[Any, ...]:
  """Arguments of one `step` (random tokens), for timing it."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (config.batch_size, config.context), np.int32)
  return x, np.roll(x, -1, axis=1)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike | None
) -> dict[str, Any]:
  """Trains one run, writes `workdir/result.json` and returns it.

  Returns:
    `history` (step, epoch, wall_time (seconds in training steps, the
    compiling first step and evaluations excluded), train_loss, val_loss),
    `final` (`test_loss` and `val_loss`), `step_time`, `num_params`, for
    `muon` where it sends each parameter (`routing`) and, with a mesh, the
    final layouts of parameters and optimizer state and whether they are
    still the FSDP ones they started in.
  """
  corpus = input_pipeline.load(config.data, config.max_bytes)
  eval_bs = min(config.eval_batch_size, config.eval_windows)
  val = input_pipeline.eval_windows(
    corpus.val, config.context, config.eval_windows
  )
  test = input_pipeline.eval_windows(
    corpus.test, config.context, config.eval_windows
  )
  mesh = make_mesh(config.mesh) if config.mesh is not None else None
  if mesh is not None and config.batch_size % mesh.size:
    raise ValueError(
      f'`batch_size` {config.batch_size} must be a multiple of the '
      f'{mesh.size} devices of `mesh` {config.mesh}.'
    )
  # Under the ambient mesh Muon splits its Newton–Schulz work over devices.
  ctx = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
  with ctx:
    model, optimizer, step_fn = create_train_state(config, mesh)
    num_params = count_params(model)
    diagnostics = bool(config.optimizer_kwargs.get('diagnostics'))
    routing = None
    if config.optimizer == 'muon':
      routing = muon_optax.describe(muon_routing(config, model))
    logging.info(
      'Transformer d%d x %d layers: %d parameters; %s at peak lr %g; %d steps',
      config.d_model,
      config.num_layers,
      num_params,
      config.optimizer,
      config.learning_rate,
      config.steps,
    )

    epochs_per_step = config.batch_size * config.context / len(corpus.train)
    data = input_pipeline.batches(
      corpus.train,
      config.batch_size,
      config.context,
      np.random.default_rng(config.seed),
    )
    history, losses, max_logits = [], [], []
    wall, first_step_time = 0.0, 0.0
    for step in range(1, config.steps + 1):
      x, y = next(data)
      t0 = time.perf_counter()
      out = step_fn(x, y)
      jax.block_until_ready(out)
      loss, max_logit = out if isinstance(out, tuple) else (out, None)
      dt = time.perf_counter() - t0
      if step == 1:
        first_step_time = dt  # compiles, unless an earlier run did
      else:
        wall += dt
      losses.append(loss)
      if max_logit is not None:
        max_logits.append(float(max_logit))
      if step % config.eval_every == 0 or step == config.steps:
        val_loss = evaluate(model, val, eval_bs)
        history.append(
          {
            'step': step,
            'epoch': step * epochs_per_step,
            'wall_time': wall,
            'train_loss': float(np.mean([float(v) for v in losses])),
            'val_loss': val_loss,
          }
        )
        losses.clear()
        if max_logits:  # the largest attention logit since the last point
          history[-1]['max_logit'] = max(max_logits)
          max_logits.clear()
        if diagnostics:
          history[-1]['layers'] = layer_metrics(optimizer)
        logging.info(
          'step %d: train_loss %.4f, val_loss %.4f; %.1f s training',
          step,
          history[-1]['train_loss'],
          val_loss,
          wall,
        )
    test_loss = evaluate(model, test, eval_bs)
    logging.info('test_loss %.4f', test_loss)
    placement = {'param_shardings': None}
    if mesh is not None:  # where training left parameters and state
      placement = {
        'param_shardings': layouts(nnx.state(model, nnx.Param)),
        'state_shardings': layouts(nnx.state(optimizer)),
        'layouts_kept': in_fsdp_layouts(nnx.state(model), mesh)
        and in_fsdp_layouts(nnx.state(optimizer), mesh),
      }

  result = {
    'optimizer': config.optimizer,
    'optimizer_kwargs': dict(config.optimizer_kwargs),
    'seed': config.seed,
    'learning_rate': config.learning_rate,
    'final': {'test_loss': test_loss, 'val_loss': history[-1]['val_loss']},
    'history': history,
    'step_time': wall / max(1, config.steps - 1),
    'first_step_time': first_step_time,
    'total_steps': config.steps,
    'batch_size': config.batch_size,
    'tokens_per_step': config.batch_size * config.context,
    'num_params': num_params,
    'routing': routing,
    'data': corpus.source,
    'mesh': config.mesh,
    **placement,
  }
  if workdir is not None:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'result.json').write_text(json.dumps(result, indent=1))
  return result


def layer_metrics(optimizer: nnx.Optimizer) -> dict[str, dict[str, float]]:
  """Per Muon layer: orthogonality error and update RMS ÷ weight RMS.

  Needs `optimizer_kwargs={'diagnostics': True}` with `muon`.
  """
  metrics = muon_optax.diagnostics(optimizer.opt_state)
  return {
    path: {
      'orthogonality_error': float(m['orthogonality_error']),
      'update_to_weight_rms': float(m['update_to_weight_rms']),
    }
    for path, m in metrics.items()
    if 'orthogonality_error' in m
  }
