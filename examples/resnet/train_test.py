"""Runs the ResNet example on a tiny config, in seconds."""

import json
import math
import pathlib
import subprocess
import sys

from flax import nnx
import jax
import pytest

import muon_optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from resnet import models  # noqa: E402
from resnet import train  # noqa: E402
from resnet.configs import tiny  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def _with(config, **changes):
  """A copy of `config` with these (existing) fields set."""
  config = config.copy_and_resolve_references()
  for name, value in changes.items():
    assert name in config, name
    setattr(config, name, value)
  return config


def _tiny(**changes):
  return _with(
    tiny.get_config(), epochs=1.0, train_size=256, stage_sizes=(1, 1), **changes
  )


@pytest.mark.slow
def test_train_and_evaluate(tmp_path):
  result = train.train_and_evaluate(_tiny(learning_rate=0.01), tmp_path)
  assert json.loads((tmp_path / 'result.json').read_text()) == result
  assert result['optimizer'] == 'muon' and result['total_steps'] == 4
  assert [h['step'] for h in result['history']] == [2, 4]
  assert math.isfinite(result['history'][-1]['train_loss'])
  assert 0.0 <= result['final']['test_accuracy'] <= 1.0


@pytest.mark.slow
def test_main_reads_config_file_and_overrides(tmp_path):
  """The flags as a user types them (absl, ml_collections.config_flags)."""
  cmd = [
    sys.executable,
    str(pathlib.Path(__file__).with_name('main.py')),
    f'--workdir={tmp_path}',
    f'--config={pathlib.Path(tiny.__file__)}',
    '--config.stage_sizes=(1, 1)',
    '--config.epochs=0.5',
    '--config.train_size=256',
    '--config.optimizer=adamw',
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads((tmp_path / 'result.json').read_text())
  assert result['optimizer'] == 'adamw' and result['total_steps'] == 2
  bad = subprocess.run(
    [*cmd[:3], '--epochs=1'], capture_output=True, text=True, check=False
  )
  assert bad.returncode != 0 and 'epochs' in bad.stderr


def _resnet_params(width, stage_sizes, num_classes=10):
  """Parameter count of a CIFAR ResNet, from the architecture's definition."""
  count = 27 * width + 2 * width  # 3x3 stem on RGB, its BatchNorm
  in_features = width
  for i, size in enumerate(stage_sizes):
    f = width * 2**i
    for _ in range(size):
      count += 9 * in_features * f + 9 * f * f + 2 * 2 * f
      if in_features != f:  # 1x1 projection shortcut and its BatchNorm
        count += in_features * f + 2 * f
      in_features = f
  return count + in_features * num_classes + num_classes


@pytest.mark.parametrize('width', [16, 64])
def test_resnet18_parameter_count(width):
  model = nnx.eval_shape(
    lambda: models.ResNet(10, width=width, rngs=nnx.Rngs(0))
  )
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == _resnet_params(width, (2, 2, 2, 2))
  assert train.count_params(model) == count


def test_projection_shortcuts_where_the_shape_changes():
  model = nnx.eval_shape(lambda: models.ResNet(10, width=4, rngs=nnx.Rngs(0)))
  projected = [b.shortcut is not None for b in model.blocks]
  assert projected == [False, False, True, False, True, False, True, False]
  assert model.blocks[2].shortcut.kernel.shape == (1, 1, 4, 8)


def test_input_pipeline_is_the_convnets():
  """The two examples share their splits; each carries its own copy."""
  here = (HERE / 'input_pipeline.py').read_text()
  assert here == (HERE.parent / 'convnet/input_pipeline.py').read_text()


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
