"""Trains and evaluates the CIFAR ResNet (Flax NNX) with one optimizer."""

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

import muon_optax
from resnet import input_pipeline
from resnet import models

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


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@nnx.jit(static_argnames=('flip', 'translate'))
def train_step(
  model, optimizer, images, labels, key, mean, std, *, flip, translate
):
  """One step on a uint8 batch, augmented on the device; returns the loss."""
  x = input_pipeline.normalize(
    input_pipeline.augment(key, images, flip, translate), mean, std
  )

  def loss_fn(model):
    return cross_entropy(model(x), labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model, images, labels, mask, mean, std):
  logits = model(input_pipeline.normalize(images, mean, std))
  correct = jnp.argmax(logits, -1) == labels
  return (
    jnp.sum(cross_entropy(logits, labels) * mask),
    jnp.sum(correct * mask),
  )


def evaluate(model, split, batch_size, mean, std) -> tuple[float, float]:
  """(mean loss, accuracy) over `split`, padding the last batch."""
  model.eval()
  n = len(split.labels)
  total_loss, total_correct = 0.0, 0.0
  for i in range(0, n, batch_size):
    x = np.asarray(split.images[i : i + batch_size])
    y = np.asarray(split.labels[i : i + batch_size])
    mask = np.ones(len(y), np.float32)
    if len(y) < batch_size:
      pad = batch_size - len(y)
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    loss, correct = eval_step(model, x, y, mask, mean, std)
    total_loss += float(loss)
    total_correct += float(correct)
  model.train()
  return total_loss / n, total_correct / n


def model_name(config: ml_collections.ConfigDict) -> str:
  return f'ResNet, width {config.width}, stages {config.stage_sizes}'


def create_model(
  config: ml_collections.ConfigDict, num_classes: int
) -> nnx.Module:
  return models.ResNet(
    num_classes,
    width=config.width,
    stage_sizes=config.stage_sizes,
    rngs=nnx.Rngs(config.seed),
  )


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def create_train_state(
  config: ml_collections.ConfigDict, num_classes: int, total_steps: int
) -> tuple[nnx.Module, nnx.Optimizer, Any]:
  """`(model, optimizer, step)`; `step(images, labels, key, mean, std)`
  trains on one uint8 batch and returns its loss."""
  model = create_model(config, num_classes)
  tx = _shared_optimizer(config, model, total_steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  set_learning_rate(optimizer, config.learning_rate)
  step = functools.partial(
    nnx.cached_partial(train_step, model, optimizer),
    flip=config.flip,
    translate=config.translate,
  )
  return model, optimizer, step


def example_batch(config: ml_collections.ConfigDict) -> tuple[Any, ...]:
  """Arguments of one `step` (random images and labels), for timing it."""
  rng = np.random.default_rng(0)
  n = config.batch_size
  return (
    rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
    rng.integers(0, 10, n).astype(np.int32),
    jax.random.key(0),
    np.full(3, 0.5, np.float32),
    np.full(3, 0.25, np.float32),
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike | None
) -> dict[str, Any]:
  """Trains one run, writes `workdir/result.json` and returns it.

  Returns:
    `history` (one entry per evaluation: step, epoch, wall_time (seconds in
    training steps, the compiling first step and evaluations excluded),
    train_loss, val_loss, val_accuracy), `final` (`test_accuracy` and
    `test_loss` if there is a test split, and the last validation figures),
    `step_time`, `num_params`, the budget and, for `muon`, where it sends
    each parameter (`routing`, `muon_optax.describe`).
  """
  data = input_pipeline.get_datasets(config)
  train, val = data.train, data.val
  steps_per_epoch = len(train.labels) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(
      f'`batch_size` {config.batch_size} exceeds the {len(train.labels)} '
      'training images.'
    )
  total_steps = max(1, round(config.epochs * steps_per_epoch))
  eval_every = max(1, steps_per_epoch // config.evals_per_epoch)
  mean, std = input_pipeline.channel_stats(train)

  model, optimizer, step_fn = create_train_state(
    config, len(data.classes), total_steps
  )
  num_params = count_params(model)
  diagnostics = bool(config.optimizer_kwargs.get('diagnostics'))
  routing = None
  if config.optimizer == 'muon':
    routing = muon_optax.describe(muon_routing(config, model))
  logging.info(
    '%s: %d parameters; %s at peak lr %g; %d steps (%d per epoch)',
    model_name(config),
    num_params,
    config.optimizer,
    config.learning_rate,
    total_steps,
    steps_per_epoch,
  )

  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  history, losses = [], []
  wall, step, first_step_time = 0.0, 0, 0.0
  while step < total_steps:
    for images, labels in input_pipeline.batches(train, config.batch_size, rng):
      key, sub = jax.random.split(key)
      t0 = time.perf_counter()
      loss = step_fn(images, labels, sub, mean, std)
      loss.block_until_ready()
      dt = time.perf_counter() - t0
      if step == 0:
        first_step_time = dt  # compiles, unless an earlier run did
      else:
        wall += dt
      losses.append(loss)
      step += 1
      if step % eval_every == 0 or step == total_steps:
        val_loss, val_acc = evaluate(
          model, val, config.eval_batch_size, mean, std
        )
        history.append(
          {
            'step': step,
            'epoch': step / steps_per_epoch,
            'wall_time': wall,
            'train_loss': float(np.mean([float(x) for x in losses])),
            'val_loss': val_loss,
            'val_accuracy': val_acc,
          }
        )
        losses.clear()
        if diagnostics:
          history[-1]['layers'] = layer_metrics(optimizer)
        logging.info(
          'step %d (epoch %.2f): train_loss %.4f, val_loss %.4f, '
          'val_accuracy %.4f; %.1f s training',
          *(history[-1][k] for k in ('step', 'epoch', 'train_loss')),
          val_loss,
          val_acc,
          wall,
        )
      if step == total_steps:
        break

  final = {
    'val_accuracy': history[-1]['val_accuracy'],
    'val_loss': history[-1]['val_loss'],
  }
  if data.test is not None:
    test_loss, test_acc = evaluate(
      model, data.test, config.eval_batch_size, mean, std
    )
    final.update(test_accuracy=test_acc, test_loss=test_loss)
    logging.info('test_accuracy %.4f, test_loss %.4f', test_acc, test_loss)
  result = {
    'optimizer': config.optimizer,
    'optimizer_kwargs': dict(config.optimizer_kwargs),
    'seed': config.seed,
    'learning_rate': config.learning_rate,
    'final': final,
    'history': history,
    'step_time': wall / max(1, total_steps - 1),
    'first_step_time': first_step_time,
    'steps_per_epoch': steps_per_epoch,
    'total_steps': total_steps,
    'batch_size': config.batch_size,
    'num_params': num_params,
    'routing': routing,
    'data': data.source,
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
