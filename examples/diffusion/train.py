"""Trains and evaluates the DDPM U-Net (Flax NNX) with one optimizer."""

import functools
import json
import logging
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

from diffusion import ddpm
from diffusion import input_pipeline
from diffusion import models
import muon_optax

OPTIMIZERS = ('muon', 'adamw', 'nadamw', 'sgd', 'optax_muon', 'normuon')
# The held-out noise: fixed for every run, optimizer and seed.
EVAL_SEED = 2024
SAMPLE_SEED = 2025


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
    if name == 'muon':  # routing from the model: convs to Muon, the rest Adam
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

  make(config.learning_rate)  # bad names and kwargs fail here, not in jit
  return optax.inject_hyperparams(make)(learning_rate=config.learning_rate)


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
  )
  if key not in _OPTIMIZERS:
    _OPTIMIZERS[key] = create_optimizer(config, model, total_steps)
  return _OPTIMIZERS[key]


def to_signed(images: jax.Array) -> jax.Array:
  """uint8 pixels to [-1, 1], the range the diffusion process works in."""
  return images.astype(jnp.float32) / 127.5 - 1.0


@nnx.jit(static_argnames=('flip',))
def train_step(model, optimizer, images, key, alpha_bars, *, flip):
  """One step on a uint8 batch: flips, a uniform timestep and Gaussian noise
  per image, drawn on the device; returns the mean denoising loss."""
  key_aug, key_t, key_noise = jax.random.split(key, 3)
  x0 = to_signed(input_pipeline.augment(key_aug, images, flip, 0))
  t = jax.random.randint(key_t, (x0.shape[0],), 0, alpha_bars.shape[0])
  noise = jax.random.normal(key_noise, x0.shape)

  def loss_fn(model):
    return ddpm.denoising_loss(model, x0, t, noise, alpha_bars).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model, images, t, first, alpha_bars):
  """Per-image denoising loss of images `first..` at their fixed timesteps
  `t`, with their fixed noise."""
  x0 = to_signed(images)
  # threefry whatever the default: its draws under vmap are the same for
  # every batch size, so each image's noise is fixed (not so with 'rbg').
  key = jax.random.key(EVAL_SEED, impl='threefry2x32')
  noise = ddpm.eval_noise(key, first, x0.shape[0], x0.shape[1:])
  return ddpm.denoising_loss(model, x0, t, noise, alpha_bars)


def evaluate(
  model, images, levels: int, batch_size: int, alpha_bars
) -> tuple[float, dict[int, float]]:
  """(mean loss, {timestep: mean loss}) of `images` at their fixed noise
  levels and draws (`ddpm.eval_timesteps`, `ddpm.eval_noise`).

  The mean is over the levels, each level's own mean weighted alike.
  """
  n = len(images)
  ts = ddpm.eval_timesteps(n, levels, alpha_bars.shape[0])
  losses = []
  for i in range(0, n, batch_size):
    x = np.asarray(images[i : i + batch_size])
    t = ts[i : i + batch_size]
    if len(x) < batch_size:  # pad the last batch: one compiled shape
      pad = batch_size - len(x)
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      t = np.concatenate([t, np.zeros(pad, t.dtype)])
    losses.append(np.asarray(eval_step(model, x, t, i, alpha_bars)))
  losses = np.concatenate(losses)[:n]
  by_level = {int(t): float(losses[ts == t].mean()) for t in np.unique(ts)}
  return float(np.mean(list(by_level.values()))), by_level


@functools.partial(nnx.jit, static_argnames=('steps',))
def _sample(model, noise, alpha_bars, *, steps):
  return ddpm.ddim_sample(model, noise, alpha_bars, steps)


def sample(model, config: ml_collections.ConfigDict, alpha_bars) -> np.ndarray:
  """`config.samples` uint8 images by DDIM from noise of a fixed seed (the
  same start for every run, so grids compare side by side)."""
  shape = (config.samples, 32, 32, 3)
  noise = jax.random.normal(jax.random.key(SAMPLE_SEED), shape)
  x = _sample(model, noise, alpha_bars, steps=config.sample_steps)
  return np.asarray(jnp.round((x + 1) * 127.5), np.uint8)


def image_grid(images: np.ndarray, columns: int = 8, gap: int = 2):
  """A (rows·(32+gap), columns·(32+gap), 3) uint8 mosaic of `images`."""
  n, h, w, c = images.shape
  columns = min(columns, n)
  rows = -(-n // columns)
  grid = np.full((rows * (h + gap), columns * (w + gap), c), 255, np.uint8)
  for i, im in enumerate(images):
    r, q = divmod(i, columns)
    grid[
      r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w
    ] = im
  return grid


def model_name(config: ml_collections.ConfigDict) -> str:
  return f'U-Net, widths {config.widths}, patch {config.patch}'


def create_model(config: ml_collections.ConfigDict) -> models.UNet:
  return models.UNet(
    config.widths,
    config.blocks,
    config.heads,
    config.groups,
    patch=config.patch,
    rngs=nnx.Rngs(config.seed),
  )


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def create_train_state(
  config: ml_collections.ConfigDict,
) -> tuple[models.UNet, nnx.Optimizer, Any]:
  """`(model, optimizer, step)`; `step(images, key)` trains on one uint8
  batch and returns its loss."""
  model = create_model(config)
  tx = _shared_optimizer(config, model, config.steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  set_learning_rate(optimizer, config.learning_rate)
  alpha_bars = jnp.asarray(ddpm.cosine_alpha_bars(config.timesteps))
  step = functools.partial(
    nnx.cached_partial(train_step, model, optimizer), flip=config.flip
  )
  return model, optimizer, lambda images, key: step(images, key, alpha_bars)


def example_batch(config: ml_collections.ConfigDict) -> tuple[Any, ...]:
  """Arguments of one `step` (random images), for timing it."""
  rng = np.random.default_rng(0)
  shape = (config.batch_size, 32, 32, 3)
  return rng.integers(0, 256, shape, dtype=np.uint8), jax.random.key(0)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike | None
) -> dict[str, Any]:
  """Trains one run, writes `workdir/result.json` (and `samples.png`) and
  returns the result.

  Returns:
    `history` (one entry per evaluation: step, epoch, wall_time (seconds in
    training steps, the compiling first step and evaluations excluded),
    train_loss, val_loss), `final` (`test_loss`, `test_loss_by_t` and the
    last `val_loss`), `step_time`, `num_params`, the budget and, for `muon`,
    where it sends each parameter (`routing`, `muon_optax.describe`).
  """
  data = input_pipeline.get_datasets(config)
  train, val = data.train, data.val
  if config.batch_size > len(train.labels):
    raise ValueError(
      f'`batch_size` {config.batch_size} exceeds the {len(train.labels)} '
      'training images.'
    )
  if not 0 < config.eval_size <= len(val.labels):
    raise ValueError(
      f'`eval_size` must be in (0, {len(val.labels)}] (`val_size`), got '
      f'{config.eval_size}.'
    )
  alpha_bars = jnp.asarray(ddpm.cosine_alpha_bars(config.timesteps))
  val_images = val.images[: config.eval_size]
  model, optimizer, step_fn = create_train_state(config)
  num_params = count_params(model)
  diagnostics = bool(config.optimizer_kwargs.get('diagnostics'))
  routing = None
  if config.optimizer == 'muon':
    routing = muon_optax.describe(muon_routing(config, model))
  logging.info(
    '%s: %d parameters; %s at peak lr %g; %d steps of %d images',
    model_name(config),
    num_params,
    config.optimizer,
    config.learning_rate,
    config.steps,
    config.batch_size,
  )

  def evaluate_on(images):
    return evaluate(
      model, images, config.eval_levels, config.eval_batch_size, alpha_bars
    )

  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  epochs_per_step = config.batch_size / len(train.labels)
  history, losses = [], []
  wall, step, first_step_time = 0.0, 0, 0.0
  while step < config.steps:
    for images, _ in input_pipeline.batches(train, config.batch_size, rng):
      key, sub = jax.random.split(key)
      t0 = time.perf_counter()
      loss = step_fn(images, sub)
      loss.block_until_ready()
      dt = time.perf_counter() - t0
      if step == 0:
        first_step_time = dt  # compiles, unless an earlier run did
      else:
        wall += dt
      losses.append(loss)
      step += 1
      if step % config.eval_every == 0 or step == config.steps:
        val_loss, _ = evaluate_on(val_images)
        history.append(
          {
            'step': step,
            'epoch': step * epochs_per_step,
            'wall_time': wall,
            'train_loss': float(np.mean([float(x) for x in losses])),
            'val_loss': val_loss,
          }
        )
        losses.clear()
        if diagnostics:
          history[-1]['layers'] = layer_metrics(optimizer)
        logging.info(
          'step %d (epoch %.2f): train_loss %.4f, val_loss %.4f; %.1f s '
          'training',
          step,
          history[-1]['epoch'],
          history[-1]['train_loss'],
          val_loss,
          wall,
        )
      if step == config.steps:
        break

  final = {'val_loss': history[-1]['val_loss']}
  if data.test is not None:
    test_loss, by_level = evaluate_on(data.test.images)
    final.update(
      test_loss=test_loss,
      test_loss_by_t={str(t): v for t, v in by_level.items()},  # JSON keys
    )
    logging.info('test_loss %.5f', test_loss)
  result = {
    'optimizer': config.optimizer,
    'optimizer_kwargs': dict(config.optimizer_kwargs),
    'seed': config.seed,
    'learning_rate': config.learning_rate,
    'final': final,
    'history': history,
    'step_time': wall / max(1, config.steps - 1),
    'first_step_time': first_step_time,
    'total_steps': config.steps,
    'batch_size': config.batch_size,
    'num_params': num_params,
    'routing': routing,
    'data': data.source,
  }
  if workdir is not None:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    if config.samples:
      from PIL import Image  # pylint: disable=g-import-not-at-top

      grid = image_grid(sample(model, config, alpha_bars))
      Image.fromarray(grid).save(out / 'samples.png')
      result['samples'] = 'samples.png'
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
