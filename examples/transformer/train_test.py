"""Runs the Transformer example on a tiny config, in seconds."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from transformer import input_pipeline  # noqa: E402
from transformer import train  # noqa: E402


def _tiny():
  return dataclasses.replace(
    train.tiny_config(),
    d_model=16,
    num_heads=2,
    context=16,
    batch_size=4,
    steps=6,
    eval_every=3,
    eval_windows=8,
    max_bytes=20_000,
  )


@pytest.mark.parametrize('optimizer', ['muon', 'adamw', 'sgd', 'optax_muon'])
def test_train_and_evaluate(optimizer, tmp_path):
  config = _tiny()
  corpus = train.load_data(None, config)
  result = train.train_and_evaluate(
    config, corpus, optimizer=optimizer, learning_rate=1e-2, workdir=tmp_path
  )
  assert (tmp_path / 'result.json').exists()
  assert [h['step'] for h in result['history']] == [3, 6]
  assert math.isfinite(result['final']['val_loss'])
  # Six small steps from a near-uniform start stay near log(256).
  assert result['final']['val_loss'] < 1.2 * math.log(256)


def test_text_file_split(tmp_path):
  path = tmp_path / 'input.txt'
  path.write_text('abcdefghij' * 10)
  corpus = input_pipeline.load(path)
  assert len(corpus.train) == 90 and len(corpus.val) == 10
  assert bytes(corpus.val[:3]) == b'abc'


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
  assert len(corpus.train) + len(corpus.val) == 1_115_394


def test_data_parallel_fsdp_on_8_devices_equals_one_device():
  """`mesh=(2, 4)`: same losses as one device, FSDP layouts kept."""
  here = pathlib.Path(__file__).resolve()
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    f'{env.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count=8'
  )
  env['JAX_PLATFORMS'] = 'cpu'
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
  assert out['run_matrices_sharded']  # train_and_evaluate used the mesh
  assert out['rel_err'] < 1e-5
  assert out['params_keep_sharding'] and out['state_keeps_sharding']
  # Every matrix and every 2-D state leaf is split over the fsdp axis.
  assert out['matrices_sharded'] and out['state_matrices_sharded']
  assert out['state_matrices'] > 0


def test_mesh_needs_its_devices():
  config = dataclasses.replace(_tiny(), mesh=(2, 64))
  with pytest.raises(ValueError, match='needs 128 devices'):
    train.train_and_evaluate(config, train.load_data(None, config))
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
