"""Trains `ConvNet` with one optimizer at one learning rate and seed."""

from collections.abc import Callable
import dataclasses
import json
import os
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimizers

from convnet import input_pipeline
from convnet import models


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters shared by every optimizer.

  Attributes:
    widths: stem width, then one `ConvGroup` per further width.
    batch_size: training batch size.
    epochs: training epochs (over the training split minus validation).
    val_size: images carved from the training split for validation.
    test_size: when the data has no test split, images carved from the
      training split as one (before `val_size`); None: a fifth of them, at
      most 10,000; 0: none, validation accuracy is reported.
    train_size: a fixed subset of the rest to train on; None keeps all.
    flip: random horizontal flips (off for digits).
    translate: random translation by up to this many pixels (reflect pad).
    evals_per_epoch: validation points per epoch in the history.
    eval_batch_size: batch size of evaluation.
  """

  widths: tuple[int, ...] = (24, 32, 64, 128)
  batch_size: int = 128
  epochs: float = 4.0
  val_size: int = 5000
  test_size: int | None = None
  train_size: int | None = None
  flip: bool = True
  translate: int = 2
  evals_per_epoch: int = 2
  eval_batch_size: int = 500


def tiny_config() -> Config:
  """The default on digits: about a second per run on 2 CPU cores."""
  return Config(
    widths=(8, 16, 32),
    batch_size=64,
    epochs=4.0,
    val_size=200,
    flip=False,
    translate=2,
    evals_per_epoch=2,
  )


def augment(
  key: jax.Array, images: jax.Array, flip: bool, translate: int
) -> jax.Array:
  """Random flips and translations of a uint8 NHWC batch."""
  n, h, w, c = images.shape
  key_flip, key_shift = jax.random.split(key)
  if flip:
    mirror = jax.random.bernoulli(key_flip, 0.5, (n, 1, 1, 1))
    images = jnp.where(mirror, images[:, :, ::-1], images)
  if translate:
    t = translate
    padded = jnp.pad(images, ((0, 0), (t, t), (t, t), (0, 0)), mode='reflect')
    offsets = jax.random.randint(key_shift, (n, 2), 0, 2 * t + 1)
    images = jax.vmap(
      lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    )(padded, offsets)
  return images


def _normalize(images, mean, std):
  return (images.astype(jnp.float32) / 255.0 - mean) / std


_COMPILED: dict[Any, Callable[..., Any]] = {}


def _train_step_fn(tx: optax.GradientTransformation, config: Config):
  @nnx.jit
  def train_step(model, opt_state, lrs, images, labels, key, mean, std):
    x = _normalize(
      augment(key, images, config.flip, config.translate), mean, std
    )

    def loss_fn(model):
      logits = model(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    params = nnx.state(model, nnx.Param)
    updates, opt_state = tx.update(grads, opt_state, params)
    nnx.update(
      model, optax.apply_updates(params, optimizers.apply_lrs(updates, lrs))
    )
    return opt_state, loss

  return train_step


@nnx.jit
def _eval_step(model, images, labels, mask, mean, std):
  logits = model(_normalize(images, mean, std))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, -1) == labels
  return jnp.sum(loss * mask), jnp.sum(correct * mask)


def evaluate(model, split, batch_size, mean, std):
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
    loss, correct = _eval_step(model, x, y, mask, mean, std)
    total_loss += float(loss)
    total_correct += float(correct)
  model.train()
  return total_loss / n, total_correct / n


def train_and_evaluate(
  config: Config,
  dataset: input_pipeline.Dataset,
  *,
  optimizer: str = 'muon',
  learning_rate: float = 0.05,
  seed: int = 0,
  muon_config: optimizers.MuonConfig | None = None,
  workdir: str | os.PathLike | None = None,
  progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
  """Trains one run; returns `{'history': [...], 'final': {...}, ...}`.

  Args:
    config: the shared hyperparameters.
    dataset: from `input_pipeline.load`.
    optimizer: one of `optimizers.OPTIMIZERS`.
    learning_rate: peak learning rate (Muon's, for `muon`).
    seed: initialization, shuffling and augmentation seed.
    muon_config: how `muon` is set up; the ConvNet default otherwise.
    workdir: if given, the run is written to `workdir/result.json`.
    progress: a tqdm-like factory, `progress(total=..., desc=...)`.

  Returns:
    The run: `history` (one entry per evaluation: step, epoch, wall_time
    (training seconds, compilation excluded), train_loss, val_loss,
    val_accuracy), `final` (`test_accuracy` if the dataset has a test split,
    else `val_accuracy`, plus the validation figures) and `step_time`.
  """
  muon_config = muon_config or default_muon_config()
  train, val = input_pipeline.split_validation(
    dataset.train, config.val_size, config.train_size
  )
  num_classes = len(dataset.classes)
  steps_per_epoch = len(train.labels) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(
      f'`batch_size` {config.batch_size} exceeds the {len(train.labels)} '
      'training images.'
    )
  total_steps = max(1, int(round(config.epochs * steps_per_epoch)))
  eval_every = max(1, steps_per_epoch // config.evals_per_epoch)
  mean = jnp.asarray(train.images.reshape(-1, 3).mean(0) / 255.0, jnp.float32)
  std = jnp.asarray(train.images.reshape(-1, 3).std(0) / 255.0, jnp.float32)

  model = models.ConvNet(num_classes, config.widths, rngs=nnx.Rngs(seed))
  params = nnx.state(model, nnx.Param)
  tx = optimizers.build(optimizer, model, total_steps, muon_config)
  lrs = optimizers.leaf_lrs(
    optimizer, model, params, learning_rate, muon_config
  )
  opt_state = tx.init(params)
  cache_key = (config, optimizer, muon_config, num_classes, total_steps)
  if cache_key not in _COMPILED:
    _COMPILED[cache_key] = _train_step_fn(tx, config)
  train_step = _COMPILED[cache_key]

  np_rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  bar = (
    progress(total=total_steps, desc=f'{optimizer} lr={learning_rate:g}')
    if progress
    else None
  )
  history, losses = [], []
  wall, step, compile_time = 0.0, 0, 0.0

  def log():
    val_loss, val_acc = evaluate(model, val, config.eval_batch_size, mean, std)
    train_loss = float(np.mean([float(x) for x in losses])) if losses else None
    losses.clear()
    history.append(
      {
        'step': step,
        'epoch': step / steps_per_epoch,
        'wall_time': wall,
        'train_loss': train_loss,
        'val_loss': val_loss,
        'val_accuracy': val_acc,
      }
    )
    if optimizer == 'muon' and muon_config.diagnostics:
      history[-1]['layers'] = optimizers.layer_metrics(opt_state, learning_rate)
    if bar:
      bar.set_postfix(val_acc=f'{val_acc:.3f}')

  while step < total_steps:
    for images, labels in input_pipeline.batches(
      train, config.batch_size, np_rng
    ):
      key, sub = jax.random.split(key)
      t0 = time.perf_counter()
      opt_state, loss = train_step(
        model, opt_state, lrs, images, labels, sub, mean, std
      )
      loss.block_until_ready()
      dt = time.perf_counter() - t0
      if step == 0:
        compile_time = dt  # the first call compiles (once per optimizer)
      else:
        wall += dt
      losses.append(loss)
      step += 1
      if bar:
        bar.update()
      if step % eval_every == 0 or step == total_steps:
        log()
      if step == total_steps:
        break
  if bar:
    bar.close()

  final = {
    'val_accuracy': history[-1]['val_accuracy'],
    'val_loss': history[-1]['val_loss'],
  }
  if dataset.test is not None:
    test_loss, test_acc = evaluate(
      model, dataset.test, config.eval_batch_size, mean, std
    )
    final.update(test_accuracy=test_acc, test_loss=test_loss)
  result = {
    'optimizer': optimizer,
    'seed': seed,
    'learning_rate': learning_rate,
    'final': final,
    'history': history,
    'step_time': wall / max(1, total_steps - 1),
    'first_step_time': compile_time,
    'steps_per_epoch': steps_per_epoch,
    'total_steps': total_steps,
  }
  if workdir is not None:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'result.json').write_text(json.dumps(result, indent=1))
  return result


METRIC = 'val_accuracy'
HIGHER_IS_BETTER = True
EMBEDDED_DATA = 'sklearn digits'


def load_data(
  data: str | None, config: Config, cache_dir: str | None = None
) -> input_pipeline.Dataset:
  dataset = input_pipeline.load(data, cache_dir)
  size = config.test_size
  if size is None:
    size = min(10_000, len(dataset.train.labels) // 5)
  if dataset.test is None and size:
    dataset = input_pipeline.holdout_test(dataset, size)
  return dataset


def routing_table(
  config: Config,
  dataset: input_pipeline.Dataset,
  muon_config: optimizers.MuonConfig,
) -> str:
  """Where `muon` sends each parameter of this task's model."""
  model = models.ConvNet(len(dataset.classes), config.widths, rngs=nnx.Rngs(0))
  return optimizers.describe(model, muon_config)


def default_muon_config() -> optimizers.MuonConfig:
  """Muon's conv setup: jordan scaling, the Adam part at 1/50 the lr.

  Measured on CIFAR-10 here (single seed): Muon lr 0.05 with Adam at 1e-3
  beat a shared lr with 'rms' scaling.
  """
  return optimizers.MuonConfig(scaling='jordan', adam_lr_ratio=0.02)


def final_metric(dataset: input_pipeline.Dataset) -> str:
  return 'test_accuracy' if dataset.test is not None else 'val_accuracy'


def describe_budget(config: Config, run: dict[str, Any]) -> str:
  return (
    f'{run["total_steps"]} steps = {config.epochs:g} epochs of '
    f'{run["steps_per_epoch"]} batches of {config.batch_size}'
  )


def scale_budget(config: Config, fraction: float) -> Config:
  return dataclasses.replace(config, epochs=config.epochs * fraction)
