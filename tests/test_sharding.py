"""`scale_by_muon` on 8 emulated devices: equal to one device, shardings kept.

The rest of the suite runs on one CPU device in this process, and the device
count is fixed when jax starts, so the checks run in subprocesses of
`tests/sharding_checks.py` with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (two at a time, one per
core) and the tests assert on the JSON they print.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import muon_optax

pytestmark = pytest.mark.slow  # subprocesses on 8 emulated devices

SCRIPT = pathlib.Path(__file__).with_name('sharding_checks.py')
ROOT = SCRIPT.parent.parent
LAYOUTS = (
  'data_parallel',
  'fsdp_rows',
  'fsdp_cols',
  'tensor_parallel',
  'stacked',
)
RTOL = 1e-5


def _spawn(*checks):
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    f'{env.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count=8'
  )
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
    p for p in (str(ROOT), env.get('PYTHONPATH')) if p
  )
  return subprocess.Popen(
    [sys.executable, str(SCRIPT), *checks],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.fixture(scope='module')
def results():
  procs = [
    _spawn('explicit', 'alias', 'bf16'),
    _spawn('mesh_arg', 'flops', 'trap'),
  ]
  out = {}
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    out.update(json.loads(stdout))
  return out


@pytest.mark.parametrize('mode', ['explicit', 'mesh_arg'])
@pytest.mark.parametrize('layout', LAYOUTS)
def test_equals_single_device(results, mode, layout):
  r = results[mode][layout]
  assert r['rel_err'] < RTOL, r


@pytest.mark.parametrize('mode', ['explicit', 'mesh_arg'])
@pytest.mark.parametrize('layout', LAYOUTS)
def test_updates_and_momentum_keep_param_sharding(results, mode, layout):
  r = results[mode][layout]
  assert r['updates_keep_sharding'], r
  assert r['momentum_keeps_sharding'], r


@pytest.mark.parametrize('mode', ['explicit', 'mesh_arg'])
def test_state_types_unchanged_by_update(results, mode):
  r = results[mode]
  assert r['init_and_update_state_types_equal'], r
  assert r['state_types_kept'], r
  assert r['update_types_equal_grad_types'], r


def test_no_recompilation_across_steps(results):
  assert results['mesh_arg']['recompiles'] == 0
  assert results['explicit']['recompiles'] == 0


def test_muon_alias_on_fsdp(results):
  r = results['alias']
  assert r['rel_err'] < RTOL, r
  assert r['updates_keep_sharding'], r


@pytest.mark.parametrize('layout', ['replicated', 'fsdp'])
def test_per_device_flops_are_a_fraction(results, layout):
  # The targets: <= 0.2 sharded, <= 0.3 replicated; 1/8 is ideal.
  fraction = results['flops'][layout]['fraction']
  assert fraction <= (0.2 if layout == 'fsdp' else 0.3), results['flops']


def test_no_mesh_is_the_single_device_path():
  # One device here: no mesh, an empty ambient one and a 1-device mesh all
  # give the same update as the default.
  params = {'w': jax.numpy.arange(48.0).reshape(6, 8) / 48}
  grads = {'w': jax.numpy.cos(params['w'])}
  default = muon_optax.scale_by_muon()
  ref, _ = jax.jit(default.update)(grads, default.init(params))
  mesh = jax.make_mesh((1,), ('d',))
  tx = muon_optax.scale_by_muon(mesh=mesh)
  out, _ = jax.jit(tx.update)(grads, tx.init(params))
  assert jax.numpy.array_equal(out['w'], ref['w'])


def test_mesh_must_be_a_mesh():
  with pytest.raises(TypeError, match='`mesh`'):
    muon_optax.scale_by_muon(mesh='data')


def test_device_put_params_without_a_mesh_split_the_work(results):
  """The common pattern (sharded params, plain `jax.jit`, no `set_mesh` nor
  `mesh=`): with explicit mesh axes the updates' types carry the mesh, so
  the Newton–Schulz work is split and each leaf keeps its sharding. With
  auto axes nothing in `jit` says which mesh; the update is still right."""
  trap = results['trap']
  explicit, auto = trap['AxisType.Explicit'], trap['AxisType.Auto']
  assert explicit['rel_err'] < RTOL and auto['rel_err'] < RTOL
  assert explicit['updates_keep_sharding'], explicit['layers_spec']
  assert explicit['fraction'] < 0.25, explicit


@pytest.mark.parametrize('strategy', ['stack', 'unroll', 'map'])
def test_bfloat16_on_the_sharded_path(results, strategy):
  r = results['bf16'][strategy]
  assert r['rel_err'] < 0.05, r  # bfloat16 operands, float32 accumulation
  assert r['updates_keep_sharding'], r
