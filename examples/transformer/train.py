"""Trains the byte-level `Transformer` with one optimizer, lr and seed."""

from collections.abc import Callable
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import numpy as np
import optax
import optimizers

from transformer import input_pipeline
from transformer import models


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters shared by every optimizer.

  Attributes:
    d_model: model width.
    num_layers: Transformer blocks.
    num_heads: attention heads.
    context: tokens per training window.
    batch_size: windows per step.
    steps: training steps.
    eval_every: steps between validation points in the history.
    eval_windows: validation windows (non-overlapping, from the start of the
      validation split).
    eval_batch_size: windows per evaluation batch.
    max_bytes: size cap of the embedded corpus.
    mesh: `(data, fsdp)` device mesh shape, e.g. `(2, 4)`: batches split over
      all devices, every parameter (and its optimizer state) sharded on its
      largest axis divisible by `fsdp`. None trains on one device.
  """

  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  context: int = 64
  batch_size: int = 32
  steps: int = 600
  eval_every: int = 50
  eval_windows: int = 512
  eval_batch_size: int = 128
  max_bytes: int = 2_000_000
  mesh: tuple[int, int] | None = None


def tiny_config() -> Config:
  """A seconds-long run on the embedded corpus."""
  return Config(
    d_model=64,
    num_layers=1,
    num_heads=2,
    context=32,
    batch_size=16,
    steps=100,
    eval_every=20,
    eval_windows=128,
    max_bytes=500_000,
  )


METRIC = 'val_loss'
HIGHER_IS_BETTER = False
EMBEDDED_DATA = 'Python stdlib sources'


def load_data(
  data: str | None, config: Config, cache_dir: str | None = None
) -> input_pipeline.Corpus:
  del cache_dir  # bytes need no decoding
  return input_pipeline.load(data, config.max_bytes)


def make_model(config: Config, seed: int = 0) -> models.Transformer:
  return models.Transformer(
    input_pipeline.VOCAB_SIZE,
    config.context,
    d_model=config.d_model,
    num_layers=config.num_layers,
    num_heads=config.num_heads,
    rngs=nnx.Rngs(seed),
  )


def routing_table(
  config: Config,
  corpus: Any,
  muon_config: optimizers.MuonConfig,
) -> str:
  """Where `muon` sends each parameter of this task's model."""
  del corpus  # the model does not depend on the data
  return optimizers.describe(make_model(config), muon_config)


def default_muon_config() -> optimizers.MuonConfig:
  """'rms' scaling: Muon and its Adam part share one learning rate."""
  return optimizers.MuonConfig(scaling='rms', adam_lr_ratio=1.0)


def final_metric(corpus: input_pipeline.Corpus) -> str:
  del corpus
  return 'val_loss'


def describe_budget(config: Config, run: dict[str, Any]) -> str:
  return (
    f'{run["total_steps"]} steps of {config.batch_size}x{config.context} tokens'
  )


def _loss(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


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
  counts) and leaves with no such axis are replicated.
  """
  n = mesh.shape['fsdp']
  spec = [None] * len(shape)
  for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[axis] >= n and shape[axis] % n == 0:
      spec[axis] = 'fsdp'
      break
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def shard(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
) -> tuple[optax.OptState, tuple[Any, Any]]:
  """Shards `model` in place for FSDP; returns the sharded optimizer state.

  Returns `(opt_state, shardings)` where `shardings` holds the parameters'
  and the state's `NamedSharding`s, for the train step to keep them.
  """
  params = nnx.state(model, nnx.Param)
  param_shardings = jax.tree.map(lambda x: fsdp_sharding(mesh, x.shape), params)
  params = jax.device_put(params, param_shardings)
  nnx.update(model, params)
  state_shardings = jax.tree.map(
    lambda x: fsdp_sharding(mesh, x.shape), jax.eval_shape(tx.init, params)
  )
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  return opt_state, (param_shardings, state_shardings)


_COMPILED: dict[Any, Callable[..., Any]] = {}


def _train_step_fn(
  tx: optax.GradientTransformation, shardings: tuple[Any, Any] | None = None
):
  @nnx.jit
  def train_step(model, opt_state, lrs, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    params = nnx.state(model, nnx.Param)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, optimizers.apply_lrs(updates, lrs))
    if shardings is not None:  # auto axes: pin the layout from step to step
      params = jax.lax.with_sharding_constraint(params, shardings[0])
      opt_state = jax.lax.with_sharding_constraint(opt_state, shardings[1])
    nnx.update(model, params)
    return opt_state, loss

  return train_step


@nnx.jit
def _eval_step(model, x, y):
  return _loss(model, x, y)


def evaluate(model, windows, batch_size: int) -> float:
  """Mean next-byte cross-entropy (nats) over the validation windows."""
  x, y = windows
  total = 0.0
  for i in range(0, len(x), batch_size):
    xb, yb = x[i : i + batch_size], y[i : i + batch_size]
    if len(xb) < batch_size:  # keep one compiled shape: pad, then reweigh
      break
    total += float(_eval_step(model, xb, yb)) * len(xb)
  n = (len(x) // batch_size) * batch_size
  return total / n


def train_and_evaluate(
  config: Config,
  corpus: input_pipeline.Corpus,
  *,
  optimizer: str = 'muon',
  learning_rate: float = 1e-2,
  seed: int = 0,
  muon_config: optimizers.MuonConfig | None = None,
  workdir: str | os.PathLike | None = None,
  progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
  """Trains one run; returns `{'history': [...], 'final': {...}, ...}`.

  Args:
    config: the shared hyperparameters.
    corpus: from `input_pipeline.load`.
    optimizer: one of `optimizers.OPTIMIZERS`.
    learning_rate: peak learning rate.
    seed: initialization and batching seed.
    muon_config: how `muon` is set up; `default_muon_config()` otherwise.
    workdir: if given, the run is written to `workdir/result.json`.
    progress: a tqdm-like factory, `progress(total=..., desc=...)`.

  Returns:
    The run: `history` (step, epoch, wall_time (training seconds,
    compilation excluded), train_loss, val_loss), `final` (`val_loss`) and
    `step_time`.
  """
  mesh = make_mesh(config.mesh) if config.mesh is not None else None
  # Under the ambient mesh Muon splits its Newton–Schulz work over devices.
  context = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
  with context:
    muon_config = muon_config or default_muon_config()
    eval_bs = min(config.eval_batch_size, config.eval_windows)
    windows = input_pipeline.eval_windows(
      corpus.val, config.context, config.eval_windows
    )
    model = make_model(config, seed)
    params = nnx.state(model, nnx.Param)
    tx = optimizers.build(optimizer, model, config.steps, muon_config)
    lrs = optimizers.leaf_lrs(
      optimizer, model, params, learning_rate, muon_config
    )
    shardings = None
    if mesh is None:
      opt_state = tx.init(params)
    else:
      if config.batch_size % mesh.size:
        raise ValueError(
          f'`batch_size` {config.batch_size} must be a multiple of the '
          f'{mesh.size} devices of `mesh` {config.mesh}.'
        )
      opt_state, shardings = shard(model, tx, mesh)
      batch_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(('data', 'fsdp'))
      )
    cache_key = (config, optimizer, muon_config)
    if cache_key not in _COMPILED:
      _COMPILED[cache_key] = _train_step_fn(tx, shardings)
    train_step = _COMPILED[cache_key]

    epochs_per_step = config.batch_size * config.context / len(corpus.train)
    data = input_pipeline.batches(
      corpus.train,
      config.batch_size,
      config.context,
      np.random.default_rng(seed),
    )
    bar = None
    if progress:
      bar = progress(
        total=config.steps, desc=f'{optimizer} lr={learning_rate:g}'
      )
    history, losses = [], []
    wall, first_step_time = 0.0, 0.0
    for step in range(1, config.steps + 1):
      x, y = next(data)
      if mesh is not None:  # split the batch over every device
        x, y = jax.device_put((x, y), batch_sharding)
      t0 = time.perf_counter()
      opt_state, loss = train_step(model, opt_state, lrs, x, y)
      loss.block_until_ready()
      dt = time.perf_counter() - t0
      if step == 1:
        first_step_time = dt  # compiles (once per optimizer)
      else:
        wall += dt
      losses.append(loss)
      if bar:
        bar.update()
      if step % config.eval_every == 0 or step == config.steps:
        val_loss = evaluate(model, windows, eval_bs)
        history.append(
          {
            'step': step,
            'epoch': step * epochs_per_step,
            'wall_time': wall,
            'train_loss': float(np.mean([float(v) for v in losses])),
            'val_loss': val_loss,
          }
        )
        if optimizer == 'muon' and muon_config.diagnostics:
          history[-1]['layers'] = optimizers.layer_metrics(
            opt_state, learning_rate
          )
        losses.clear()
        if bar:
          bar.set_postfix(val_loss=f'{val_loss:.3f}')
    if bar:
      bar.close()
    layouts = None
    if mesh is not None:  # where the trained parameters live
      flat, _ = jax.tree_util.tree_flatten_with_path(
        nnx.state(model, nnx.Param)
      )
      layouts = {
        jax.tree_util.keystr(k, simple=True, separator='/'): str(
          x.sharding.spec
        )
        for k, x in flat
      }

  result = {
    'optimizer': optimizer,
    'seed': seed,
    'learning_rate': learning_rate,
    'final': {'val_loss': history[-1]['val_loss']},
    'history': history,
    'step_time': wall / max(1, config.steps - 1),
    'first_step_time': first_step_time,
    'total_steps': config.steps,
    'mesh': config.mesh,
    'param_shardings': layouts,
  }
  if workdir is not None:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'result.json').write_text(json.dumps(result, indent=1))
  return result


def scale_budget(config: Config, fraction: float) -> Config:
  steps = max(1, int(round(config.steps * fraction)))
  return dataclasses.replace(
    config, steps=steps, eval_every=min(config.eval_every, steps)
  )
