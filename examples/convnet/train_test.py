"""Runs the ConvNet example on a tiny config, in seconds."""

import json
import math
import pathlib
import subprocess
import sys

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from convnet import input_pipeline  # noqa: E402
from convnet import models  # noqa: E402
from convnet import train  # noqa: E402
from convnet.configs import tiny  # noqa: E402


def _with(config, **changes):
  """A copy of `config` with these (existing) fields set."""
  config = config.copy_and_resolve_references()
  for name, value in changes.items():
    assert name in config, name
    setattr(config, name, value)
  return config


def _tiny(**changes):
  return _with(
    tiny.get_config(), widths=(4, 8), epochs=1.0, train_size=256, **changes
  )


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', train.OPTIMIZERS)
def test_train_and_evaluate(optimizer, tmp_path):
  result = train.train_and_evaluate(
    _tiny(optimizer=optimizer, learning_rate=0.01), tmp_path
  )
  assert json.loads((tmp_path / 'result.json').read_text()) == result
  assert result['total_steps'] == 4
  assert [h['step'] for h in result['history']] == [2, 4]
  assert math.isfinite(result['history'][-1]['train_loss'])
  assert 0.0 <= result['final']['test_accuracy'] <= 1.0
  kernels = 2 * 2 * 3 * 4 + 3 * 3 * 4 * 8 + 3 * 3 * 8 * 8 + 8 * 10
  norms = 2 * 4 + 2 * 2 * 8  # scale and bias of three BatchNorms
  assert result['num_params'] == kernels + norms


@pytest.mark.slow
def test_main_reads_config_file_and_overrides(tmp_path):
  """The flags as a user types them (absl, ml_collections.config_flags)."""
  cmd = [
    sys.executable,
    str(pathlib.Path(__file__).with_name('main.py')),
    f'--workdir={tmp_path}',
    f'--config={pathlib.Path(tiny.__file__)}',
    '--config.widths=(4, 8)',
    '--config.epochs=0.5',
    '--config.train_size=256',
    '--config.optimizer=adamw',
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads((tmp_path / 'result.json').read_text())
  assert result['optimizer'] == 'adamw' and result['total_steps'] == 2
  kernels = 2 * 2 * 3 * 4 + 3 * 3 * 4 * 8 + 3 * 3 * 8 * 8 + 8 * 10
  assert result['num_params'] == kernels + 2 * 4 + 2 * 2 * 8  # + BatchNorms
  bad = subprocess.run(
    [*cmd[:3], '--epochs=1'], capture_output=True, text=True, check=False
  )
  assert bad.returncode != 0 and 'epochs' in bad.stderr


def _schedule_value(step, peak, total, warmup_fraction=0.1):
  warmup = max(1, round(warmup_fraction * total))
  if step < warmup:
    return peak * step / warmup
  return peak * max(0.0, 1 - (step - warmup) / (total - warmup))


def test_schedule_is_linear_warmup_then_linear_decay():
  schedule = train.create_learning_rate_schedule(0.3, 50, 0.1)
  for step in (0, 1, 4, 5, 6, 30, 49, 50):
    np.testing.assert_allclose(
      schedule(step), _schedule_value(step, 0.3, 50), rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize('optimizer', ['muon', 'adamw', 'sgd'])
def test_learning_rate_set_in_the_state_is_that_optimizer(optimizer):
  """One optimizer object at any lr == the optimizer built at that lr."""
  model = models.ConvNet(10, (4, 8), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  config = _tiny(optimizer=optimizer, learning_rate=0.5)
  shared = train.create_optimizer(config, model, total_steps=10)
  state = optax.tree_utils.tree_set(
    shared.init(params), learning_rate=jnp.float32(0.02)
  )
  direct = train.create_optimizer(
    _with(config, learning_rate=0.02), model, total_steps=10
  )
  direct_state = direct.init(params)
  shared_update, direct_update = jax.jit(shared.update), jax.jit(direct.update)
  key = jax.random.key(0)
  for _ in range(3):
    key, sub = jax.random.split(key)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(sub, len(leaves))
    grads = jax.tree.unflatten(
      treedef,
      [
        jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)
      ],
    )
    updates, state = shared_update(grads, state, params)
    expected, direct_state = direct_update(grads, direct_state, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-8)
    params = optax.apply_updates(params, updates)
  assert optax.tree_utils.tree_get(state, 'learning_rate') == 0.02


def test_set_learning_rate_in_an_nnx_optimizer():
  model = models.ConvNet(10, (4, 8), rngs=nnx.Rngs(0))
  tx = train.create_optimizer(_tiny(optimizer='sgd'), model, total_steps=10)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train.set_learning_rate(optimizer, 0.07)
  state = nnx.as_pure(optimizer.opt_state)
  np.testing.assert_allclose(
    optax.tree_utils.tree_get(state, 'learning_rate'), 0.07
  )


@pytest.mark.slow
def test_runs_that_differ_in_lr_and_seed_share_one_optimizer(tmp_path):
  a = train.train_and_evaluate(_tiny(optimizer='adamw'), tmp_path / 'a')
  n = len(train._OPTIMIZERS)
  b = train.train_and_evaluate(
    _tiny(optimizer='adamw', learning_rate=0.03, seed=1), tmp_path / 'b'
  )
  assert len(train._OPTIMIZERS) == n  # no new optimizer, no new compile
  assert a['history'] != b['history']


def test_bad_optimizer_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='`optimizer` must be one of'):
    train.train_and_evaluate(_tiny(optimizer='adam'), tmp_path)


def test_holdout_test_split_is_disjoint_from_validation():
  n = 100
  ids = np.arange(n, dtype=np.int32)
  images = np.broadcast_to(ids[:, None, None, None] % 256, (n, 2, 2, 3))
  dataset = input_pipeline.Dataset(
    input_pipeline.Split(np.asarray(images, np.uint8), ids), None, ('a',), 's'
  )
  carved = input_pipeline.holdout_test(dataset, 20)
  train_split, val = input_pipeline.split_validation(carved.train, 10)
  parts = [set(carved.test.labels), set(val.labels), set(train_split.labels)]
  assert [len(p) for p in parts] == [20, 10, 70]
  assert set.union(*parts) == set(ids)
  for split in (carved.test, val, train_split):  # images keep their labels
    np.testing.assert_array_equal(split.images[:, 0, 0, 0], split.labels)
  again = input_pipeline.holdout_test(dataset, 20)  # a fixed split
  np.testing.assert_array_equal(again.test.labels, carved.test.labels)
  with pytest.raises(ValueError, match='already has a test split'):
    input_pipeline.holdout_test(carved, 5)
  with pytest.raises(ValueError, match='test_size'):
    input_pipeline.holdout_test(dataset, 100)


def test_get_datasets_carves_a_test_split_when_absent(tmp_path):
  _write_jpegs(tmp_path / 'data')
  config = _with(
    _tiny(data=str(tmp_path / 'data'), cache_dir=str(tmp_path / 'c')),
    train_size=None,
  )
  splits = input_pipeline.get_datasets(_with(config, test_size=2, val_size=1))
  sizes = [len(s.labels) for s in (splits.train, splits.val, splits.test)]
  assert sizes == [3, 1, 2]
  splits = input_pipeline.get_datasets(_with(config, val_size=1))
  assert len(splits.test.labels) == 1  # a fifth of 6
  splits = input_pipeline.get_datasets(_with(config, test_size=0, val_size=1))
  assert splits.test is None


def test_augment_shifts_and_flips_whole_images():
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.uint8).reshape(2, 4, 4, 3)
  same = input_pipeline.augment(jax.random.key(0), images, False, 0)
  np.testing.assert_array_equal(same, images)
  out = input_pipeline.augment(jax.random.key(1), images, True, 1)
  assert out.shape == images.shape and out.dtype == images.dtype
  for x, y in zip(np.asarray(images), np.asarray(out), strict=True):
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode='reflect')
    crops = [pad[i : i + 4, j : j + 4] for i in range(3) for j in range(3)]
    crops += [c[:, ::-1] for c in crops]
    assert any(np.array_equal(y, c) for c in crops)


def test_digits_shape():
  ds = input_pipeline.digits()
  assert ds.train.images.shape[1:] == (32, 32, 3)
  assert ds.train.images.dtype == np.uint8
  assert len(ds.classes) == 10


def _write_jpegs(root, n_per_class=3):
  from PIL import Image

  rng = np.random.default_rng(0)
  for c in ('cat', 'dog'):
    (root / 'train' / c).mkdir(parents=True)
    for i in range(n_per_class):
      x = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
      Image.fromarray(x).save(root / 'train' / c / f'{i:04d}.jpg')


def test_folder_and_cache(tmp_path):
  data = tmp_path / 'data'
  _write_jpegs(data)
  cache = tmp_path / 'cache'
  first = input_pipeline.load(data, cache)
  again = input_pipeline.load(data, cache)  # from the .npy cache
  assert first.classes == again.classes == ('cat', 'dog')
  assert first.train.images.shape == (6, 32, 32, 3)
  np.testing.assert_array_equal(first.train.images, again.train.images)
  np.testing.assert_array_equal(first.train.labels, [0, 0, 0, 1, 1, 1])
  assert first.test is None


def test_tar_archive(tmp_path):
  import tarfile

  src = tmp_path / 'src'
  _write_jpegs(src)
  data = tmp_path / 'data'
  data.mkdir()
  with tarfile.open(data / 'train.tar.gz', 'w:gz') as tar:
    tar.add(src / 'train', arcname='train')
  ds = input_pipeline.load(data, tmp_path / 'cache')
  assert ds.train.images.shape == (6, 32, 32, 3)


def test_missing_data_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a directory'):
    input_pipeline.load(tmp_path / 'absent')


CIFAR = pathlib.Path(__file__).resolve().parents[3] / 'shared/data/cifar10'


@pytest.mark.skipif(
  not (CIFAR / 'train.tar.gz').exists(),
  reason=f'CIFAR-10 archive not found at {CIFAR}',
)
def test_cifar_archive_loads():
  ds = input_pipeline.load(CIFAR)
  assert ds.train.images.shape == (50000, 32, 32, 3)
  assert len(ds.classes) == 10


def test_head_names_moves_only_the_head_to_muon():
  config = _tiny(head_names=())
  model = train.create_model(config, 10)
  labels = train.muon_routing(config, model).labels
  default_labels = muon_optax.route(model).labels
  changed = {
    jax.tree_util.keystr(path): label
    for (path, label), (_, before) in zip(
      jax.tree_util.tree_leaves_with_path(labels),
      jax.tree_util.tree_leaves_with_path(default_labels),
      strict=True,
    )
    if label != before
  }
  assert changed == {"['head']['kernel']": 'muon'}
  params = nnx.state(model, nnx.Param)
  tx = train.create_optimizer(config, model, total_steps=6)
  updates, _ = tx.update(params, tx.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  with pytest.raises(ValueError, match='head_names'):
    train.create_optimizer(_with(config, optimizer='adamw'), model, 6)
