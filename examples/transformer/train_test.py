"""Runs the Transformer example on a tiny config, in seconds."""

import json
import math
import os
import pathlib
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import pytest

import muon_optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from transformer import input_pipeline  # noqa: E402
from transformer import train  # noqa: E402
from transformer.configs import default  # noqa: E402
from transformer.configs import tiny  # noqa: E402


def _with(config, **changes):
  """A copy of `config` with these (existing) fields set."""
  config = config.copy_and_resolve_references()
  for name, value in changes.items():
    assert name in config, name
    setattr(config, name, value)
  return config


def _tiny(**changes):
  return _with(
    tiny.get_config(),
    d_model=16,
    num_heads=2,
    context=16,
    batch_size=4,
    steps=6,
    eval_every=3,
    eval_windows=8,
    max_bytes=20_000,
    **changes,
  )


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', ['muon', 'adamw'])
def test_train_and_evaluate(optimizer, tmp_path):
  result = train.train_and_evaluate(
    _tiny(optimizer=optimizer, learning_rate=1e-2), tmp_path
  )
  assert json.loads((tmp_path / 'result.json').read_text()) == result
  assert [h['step'] for h in result['history']] == [3, 6]
  assert set(result['final']) == {'test_loss', 'val_loss'}
  # Six small steps from a near-uniform start stay near log(256).
  for loss in result['final'].values():
    assert math.isfinite(loss) and loss < 1.2 * math.log(256)


@pytest.mark.slow
def test_main_reads_config_file_and_overrides(tmp_path):
  """The flags as a user types them (absl, ml_collections.config_flags)."""
  cmd = [
    sys.executable,
    str(pathlib.Path(__file__).with_name('main.py')),
    f'--workdir={tmp_path}',
    f'--config={pathlib.Path(tiny.__file__)}',
    '--config.d_model=16',
    '--config.context=16',
    '--config.batch_size=4',
    '--config.steps=6',
    '--config.eval_every=3',
    '--config.eval_windows=8',
    '--config.max_bytes=20000',
    '--config.learning_rate=0.03',
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads((tmp_path / 'result.json').read_text())
  assert result['learning_rate'] == 0.03 and result['total_steps'] == 6
  bad = subprocess.run(
    [*cmd[:3], '--epochs=1'], capture_output=True, text=True, check=False
  )
  assert bad.returncode != 0 and 'epochs' in bad.stderr


def test_default_config_has_over_a_million_parameters():
  config = default.get_config()
  model = nnx.eval_shape(lambda: train.create_model(config))
  d, layers = config.d_model, config.num_layers
  per_block = 4 * d * d + 2 * 4 * d * d + 4 * d + d + 2 * 2 * d
  embeds = 256 * d + config.context * d
  expected = layers * per_block + embeds + 2 * d + d * 256
  assert train.count_params(model) == expected > 1_000_000


def test_schedule_is_linear_warmup_then_linear_decay():
  schedule = train.create_learning_rate_schedule(0.3, 50, 0.1)
  values = [float(schedule(s)) for s in (0, 2, 5, 30, 50)]
  np.testing.assert_allclose(values, [0.0, 0.12, 0.3, 0.3 * 20 / 45, 0.0])


def test_text_file_split(tmp_path):
  path = tmp_path / 'input.txt'
  path.write_text('abcdefghij' * 10)
  corpus = input_pipeline.load(path)
  assert [len(corpus.train), len(corpus.val), len(corpus.test)] == [90, 5, 5]
  assert bytes(corpus.val) == b'abcde' and bytes(corpus.test) == b'fghij'


def test_batches_are_shifted_windows():
  tokens = np.arange(100, dtype=np.uint8)
  x, y = next(input_pipeline.batches(tokens, 3, 8, np.random.default_rng(0)))
  assert x.shape == y.shape == (3, 8)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_embedded_corpus_is_deterministic():
  a = input_pipeline.stdlib_text(10_000)
  assert a == input_pipeline.stdlib_text(10_000)
  assert len(a) == 10_000


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a text file'):
    input_pipeline.load(tmp_path / 'absent.txt')


SHAKESPEARE = (
  pathlib.Path(__file__).resolve().parents[3]
  / 'shared/data/tinyshakespeare/input.txt'
)


@pytest.mark.skipif(
  not SHAKESPEARE.exists(), reason=f'tinyshakespeare not found at {SHAKESPEARE}'
)
def test_tinyshakespeare_split():
  corpus = input_pipeline.load(SHAKESPEARE)
  sizes = [len(corpus.train), len(corpus.val), len(corpus.test)]
  assert sum(sizes) == SHAKESPEARE.stat().st_size
  assert sizes[0] == int(0.9 * sum(sizes)) and abs(sizes[1] - sizes[2]) <= 1


@pytest.mark.slow
def test_data_parallel_fsdp_on_8_devices_equals_one_device():
  """`mesh=(2, 4)`: same losses as one device, FSDP layouts kept."""
  here = pathlib.Path(__file__).resolve()
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    f'{env.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count=8'
  )
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_DEFAULT_PRNG_IMPL'] = 'rbg'  # as conftest.py: faster to compile
  env['PYTHONPATH'] = os.pathsep.join(
    p for p in (str(here.parents[2]), env.get('PYTHONPATH')) if p
  )
  proc = subprocess.run(
    [sys.executable, str(here.parent / 'sharding_check.py'), 'muon'],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['devices'] == 8 and out['run_mesh'] == [2, 4]
  assert out['single_device_placed_nothing']
  assert out['rel_err'] < 1e-5
  assert out['layouts_kept']  # after training, parameters and state alike
  # Every matrix and every 2-D state leaf is split over the fsdp axis.
  assert out['matrices_sharded'] and out['state_matrices_sharded']
  assert out['state_matrices'] > 0


def test_mesh_needs_its_devices():
  with pytest.raises(ValueError, match='needs 128 devices'):
    train.train_and_evaluate(_tiny(mesh=(2, 64)), None)
  with pytest.raises(ValueError, match=r'must be \(data, fsdp\)'):
    train.make_mesh((8,))


def test_fsdp_sharding_picks_the_largest_divisible_axis():
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp')
  )
  spec = lambda shape: tuple(train.fsdp_sharding(mesh, shape).spec)
  assert spec((64, 256)) == (None, 'fsdp')
  assert spec(()) == ()
  mesh4 = jax.sharding.AbstractMesh((1, 4), ('data', 'fsdp'))
  spec4 = lambda shape: tuple(train.fsdp_sharding(mesh4, shape).spec)
  assert spec4((256, 6)) == ('fsdp', None)
  assert spec4((6, 10)) == (None, None)  # no axis divisible by 4
  assert spec4((3, 8, 2)) == (None, 'fsdp', None)


@pytest.mark.slow
def test_qk_clip_flag_records_and_caps_the_logits():
  """At a learning rate where muon's logits grow, the recorded maxima with
  QK-Clip stay near the threshold (one update of lag) and below the run
  without it."""
  base = _with(_tiny(optimizer='muon', learning_rate=0.3), steps=12)
  free = train.train_and_evaluate(_with(base, record_max_logits=True), None)
  free_max = [h['max_logit'] for h in free['history']]
  tau = 0.5 * free_max[0]
  clipped = train.train_and_evaluate(_with(base, qk_clip=tau), None)
  clipped_max = [h['max_logit'] for h in clipped['history']]
  assert max(free_max) > 2 * tau  # the logits do grow without the clip
  assert max(clipped_max[1:]) < max(free_max[1:])
  assert all(math.isfinite(v) for v in clipped_max)


@pytest.mark.slow
def test_head_names_moves_only_the_head_to_muon():
  config = _tiny(head_names=())
  model = train.create_model(config)
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
  assert changed == {"['lm_head']['kernel']": 'muon'}
  params = nnx.state(model, nnx.Param)
  tx = train.create_optimizer(config, model, total_steps=6)
  updates, _ = tx.update(params, tx.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  with pytest.raises(ValueError, match='head_names'):
    train.create_optimizer(_with(config, optimizer='adamw'), model, 6)
