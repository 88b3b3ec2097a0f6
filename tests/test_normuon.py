"""`scale_by_normuon` and `normuon` against a float64 NumPy NorMuon."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax
from tests import reference

DENSE = muon_optax.MatrixView.dense()
# (shape, leading axes that are a batch of matrices): a dense, a tall, a conv
# kernel and 3 stacked layers; biases and a norm scale go to Adam.
MATRICES = {
  'dense/kernel': ((24, 40), 0),
  'tall/kernel': ((48, 16), 0),
  'conv/kernel': ((3, 3, 8, 16), 0),
  'stacked/kernel': ((3, 20, 12), 1),
}


def _params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  params = {}
  for path, (shape, _) in MATRICES.items():
    params[path.split('/')[0]] = {'kernel': f(*shape)}
  params['dense']['bias'] = f(40)
  params['conv']['bias'] = f(16)
  params['norm'] = {'scale': f(40)}
  return params


# The stacked leaf would pass for a 1-D conv kernel by its shape alone.
VIEWS = {'stacked': {'kernel': DENSE}}


def _grads(tree, step):
  """Standard normals shaped like `tree`, from NumPy (no compiles)."""
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree
  )


def _flat(tree):
  return {
    '/'.join(str(k.key) for k in kp): x
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _matrices(x, batch_axes):
  """(B, fan_in, fan_out): leading batch axes, then (..., in) x out."""
  x = np.asarray(x, np.float64)
  b = int(np.prod(x.shape[:batch_axes]))
  return x.reshape(b, -1, x.shape[-1])


class NumpyNorMuon:
  """NorMuon on float64 matrices, written from the paper's description.

  Momentum (Nesterov), Newton–Schulz per matrix (tests/reference), then per
  output neuron (column) an EMA of its mean square, the division by its
  root, the rescale to the Newton–Schulz output's Frobenius norm, and
  `muon`'s shape scaling, weight decay and learning rate.
  """

  def __init__(self, lr, b2, eps=1e-8, beta=0.95, wd=0.0, rms=0.2):
    self.lr, self.b2, self.eps = lr, b2, eps
    self.beta, self.wd, self.rms = beta, wd, rms
    self.mu, self.v = {}, {}

  def direction(self, k, g):
    """The normalized (B, m, n) direction before shape scaling."""
    m = self.mu.get(k, np.zeros_like(g))
    m = self.beta * m + (1 - self.beta) * g
    self.mu[k] = m
    u = self.beta * m + (1 - self.beta) * g
    out = np.empty_like(u)
    v = self.v.setdefault(k, np.zeros((u.shape[0], u.shape[2])))
    for i in range(u.shape[0]):
      o = reference.newton_schulz(u[i], reference.JORDAN_STEPS)
      out[i] = self.normalize(o, v[i])
    return out

  def normalize(self, o, v):
    """One (fan_in, fan_out) matrix; updates its neurons' `v` in place."""
    for j in range(o.shape[1]):  # every output neuron on its own
      v[j] = self.b2 * v[j] + (1 - self.b2) * np.mean(np.abs(o[:, j]) ** 2)
    normed = o / np.sqrt(v + self.eps)[None, :]
    return normed * np.linalg.norm(o) / np.linalg.norm(normed)

  def step(self, params, grads):
    new = {}
    for k, (_, batch) in MATRICES.items():
      w = np.asarray(params[k], np.float64)
      o = self.direction(k, _matrices(grads[k], batch))
      fan_in, fan_out = o.shape[1:]
      o = o * self.rms * np.sqrt(max(fan_in, fan_out))
      new[k] = w * (1 - self.lr * self.wd) - self.lr * o.reshape(w.shape)
    return new


def _normuon_state(state):
  """NorMuon's state inside `normuon`'s."""
  return state.inner_states['muon'].inner_state[1]


LR, WD, B2 = 0.02, 0.1, 0.9


@pytest.fixture(scope='module')
def normuon_step():
  """One compiled `normuon` update, shared: the compiles dominate."""
  tx = muon_optax.normuon(
    LR, 'jordan', weight_decay=WD, b2=B2, matrix_views=VIEWS
  )
  return tx, jax.jit(tx.update)


def test_normuon_matches_numpy_over_several_steps(normuon_step):
  """Dense, tall, conv and stacked leaves (3 layers), Adam for the rest."""
  tx, update = normuon_step
  params = _params()
  ref = NumpyNorMuon(LR, B2, wd=WD)
  weights = {k: np.asarray(_flat(params)[k]) for k in MATRICES}
  state = tx.init(params)
  for step in range(3):
    grads = _grads(params, step)
    updates, state = update(grads, state, params)
    new = ref.step(weights, {k: _flat(grads)[k] for k in MATRICES})
    for k in MATRICES:
      np.testing.assert_allclose(
        _flat(updates)[k], new[k] - weights[k], atol=3e-6, err_msg=k
      )
  v = _flat(_normuon_state(state).v)
  for k in MATRICES:
    np.testing.assert_allclose(v[k], ref.v[k], rtol=2e-4, err_msg=k)


def test_diagnostics_compose():
  """`diagnostics=True` records the metrics; the update stays NorMuon's."""
  params = {'w': _params()['dense']['kernel'], 'b': jnp.zeros(40)}
  tx = muon_optax.normuon(LR, 'jordan', b2=B2, diagnostics=True)
  update = jax.jit(tx.update)
  state = tx.init(params)
  ref = NumpyNorMuon(LR, B2)
  for t in range(2):
    g = _grads(params, t)
    updates, state = update(g, state, params)
    want = ref.direction('w', _matrices(g['w'], 0))[0]
    want *= -LR * 0.2 * np.sqrt(40)
    np.testing.assert_allclose(updates['w'], want, atol=3e-6)
  metrics = muon_optax.diagnostics(state)
  applied = np.sqrt(np.mean(np.square(updates['w'])))
  np.testing.assert_allclose(metrics['w']['update_rms'], applied, rtol=1e-5)
  assert 0 < metrics['w']['orthogonality_error'] < 1


def test_partition_masks_adam_leaves_and_the_state_keeps_its_structure(
  normuon_step,
):
  tx, update = normuon_step
  params = _params()
  state = tx.init(params)
  v = _normuon_state(state).v
  assert isinstance(v['dense']['bias'], optax.MaskedNode)
  assert isinstance(v['norm']['scale'], optax.MaskedNode)
  want = {
    'dense': (1, 40),
    'tall': (1, 16),
    'conv': (1, 16),
    'stacked': (3, 12),
  }
  assert {k: x['kernel'].shape for k, x in v.items() if 'kernel' in x} == want
  # Checkpoint keys are the parameter paths.
  assert set(_flat(v)) == set(MATRICES)
  _, new_state = update(_grads(params, 0), state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_inject_hyperparams_injects_b2_without_static_args():
  params = {'stacked': _params()['stacked'], 'norm': _params()['norm']}
  tx = optax.inject_hyperparams(muon_optax.normuon)(
    learning_rate=LR, ns_coeffs='jordan', b2=0.9, matrix_views=VIEWS
  )
  traces = []

  @jax.jit
  def step(state, grads):
    traces.append(1)
    return tx.update(grads, state, params)

  state = tx.init(params)
  assert {'b2', 'normuon_eps', 'learning_rate'} <= set(state.hyperparams)
  ref = NumpyNorMuon(LR, 0.9)
  for t, b2 in enumerate((0.9, 0.3)):
    state = optax.tree_utils.tree_set(state, b2=jnp.asarray(b2, jnp.float32))
    ref.b2 = b2
    g = _grads(params, t)
    updates, state = step(state, g)
    u = ref.direction('s', _matrices(g['stacked']['kernel'], 1))
    want = -LR * 0.2 * np.sqrt(20) * u
    np.testing.assert_allclose(
      updates['stacked']['kernel'], want, atol=3e-6, err_msg=str(b2)
    )
  assert len(traces) == 1


def test_b2_zero_equalizes_neurons_and_keeps_muons_norm():
  """With b2=0 every output neuron of every matrix gets the same RMS, and
  each matrix keeps the Frobenius norm of Muon's (`scale_by_muon`'s) output."""
  mats = {k: x for k, x in _flat(_params()).items() if k in MATRICES}
  views = {'stacked/kernel': DENSE}
  muon = muon_optax.scale_by_muon(matrix_views=views)
  nor = optax.chain(
    muon_optax.scale_by_muon(matrix_views=views),
    muon_optax.scale_by_normuon(b2=0.0, matrix_views=views),
  )

  @jax.jit
  def both(g, s_muon, s_nor):
    return muon.update(g, s_muon), nor.update(g, s_nor)

  s_muon, s_nor = muon.init(mats), nor.init(mats)
  for t in range(2):  # b2=0 keeps no memory: every step, not only the first
    (want, s_muon), (got, s_nor) = both(_grads(mats, t), s_muon, s_nor)
    for k, (_, batch) in MATRICES.items():
      o, n = _matrices(want[k], batch), _matrices(got[k], batch)
      neuron_rms = np.sqrt(np.mean(n**2, axis=1))  # (B, fan_out)
      np.testing.assert_allclose(
        neuron_rms / neuron_rms[:, :1], np.ones_like(neuron_rms), rtol=1e-5
      )
      np.testing.assert_allclose(
        np.linalg.norm(n, axis=(1, 2)),
        np.linalg.norm(o, axis=(1, 2)),
        rtol=1e-5,
        err_msg=k,
      )
      # Muon's own output is not that even: the check can fail.
      muon_rms = np.sqrt(np.mean(o**2, axis=1))
      assert np.max(muon_rms / muon_rms[:, :1]) > 1.01, k


class JitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_update_agrees_with_numpy_with_and_without_jit(self):
    """`scale_by_normuon` alone, on given directions, over 3 steps."""
    shapes = {'w': (12, 20), 'conv': (3, 3, 2, 8), 'stack': (2, 6, 10)}
    views = {'stack': DENSE}
    tx = muon_optax.scale_by_normuon(0.8, 1e-6, matrix_views=views)
    update = self.variant(tx.update)
    x = {k: jnp.zeros(s) for k, s in shapes.items()}
    state = tx.init(x)
    ref = NumpyNorMuon(1.0, 0.8, eps=1e-6)
    rng = np.random.default_rng(5)
    for _ in range(3):
      o = {
        k: jnp.asarray(rng.standard_normal(s), jnp.float32)
        for k, s in shapes.items()
      }
      got, state = update(o, state)
      for k, shape in shapes.items():
        m = _matrices(o[k], 1 if k == 'stack' else 0)
        v = ref.v.setdefault(k, np.zeros((m.shape[0], m.shape[2])))
        want = np.stack([ref.normalize(m[i], v[i]) for i in range(len(m))])
        np.testing.assert_allclose(
          got[k], want.reshape(shape), atol=1e-5, err_msg=k
        )
    chex.assert_trees_all_close(state.v, ref.v, rtol=1e-5)
    assert int(state.count) == 3


def test_bf16_updates_keep_their_dtype_with_a_float32_moment():
  x = {'w': _params(dtype=jnp.bfloat16)['dense']['kernel']}
  tx = muon_optax.scale_by_normuon()
  state = tx.init(x)
  assert state.v['w'].dtype == jnp.float32
  u, state = tx.update(x, state)
  assert u['w'].dtype == jnp.bfloat16 and state.v['w'].dtype == jnp.float32
  chex.assert_tree_all_finite(u)


@pytest.mark.parametrize('eps', [0.0, 1e-8])
def test_zero_updates_stay_zero(eps):
  x = {'w': jnp.zeros((8, 12)), 'c': jnp.zeros((3, 3, 2, 4))}
  tx = muon_optax.scale_by_normuon(b2=0.0, eps=eps)
  u, state = tx.update(x, tx.init(x))
  for leaf in jax.tree.leaves((u, state.v)):
    assert not np.any(np.asarray(leaf))


def test_complex_updates_get_a_real_second_moment():
  rng = np.random.default_rng(1)
  o = rng.standard_normal((6, 10)) + 1j * rng.standard_normal((6, 10))
  x = {'w': jnp.asarray(o, jnp.complex64)}
  tx = muon_optax.scale_by_normuon(b2=0.0, eps=0.0)
  u, state = tx.update(x, tx.init(x))
  assert state.v['w'].dtype == jnp.float32
  assert u['w'].dtype == jnp.complex64
  want = o / np.sqrt(np.mean(np.abs(o) ** 2, axis=0))
  want *= np.linalg.norm(o) / np.linalg.norm(want)
  np.testing.assert_allclose(u['w'], want, rtol=1e-5)


@pytest.mark.parametrize(
  'kwargs,error,match',
  [
    (dict(b2=1.5), ValueError, r'`b2` must be in \[0, 1\]'),
    (dict(b2=-0.1), ValueError, '`b2`'),
    (dict(b2='0.9'), TypeError, '`b2` must be a real scalar'),
    (dict(b2=jnp.ones(3)), TypeError, '`b2`'),
    (dict(eps=-1e-8), ValueError, '`eps`'),
    (dict(eps=float('nan')), ValueError, '`eps`'),
  ],
)
def test_bad_hyperparameters_are_rejected_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    muon_optax.scale_by_normuon(**kwargs)


def test_alias_names_its_own_eps_and_b2():
  with pytest.raises(ValueError, match='`normuon_eps`'):
    muon_optax.normuon(0.01, normuon_eps=-1.0)
  with pytest.raises(ValueError, match='`b2`'):
    muon_optax.normuon(0.01, b2=2.0)


def test_non_matrix_and_mismatched_leaves_name_the_path():
  tx = muon_optax.scale_by_normuon()
  with pytest.raises(ValueError, match="'layer/bias'"):
    tx.init({'layer': {'bias': jnp.zeros(4)}})
  state = tx.init({'w': jnp.zeros((4, 6))})
  with pytest.raises(ValueError, match="'w' is 4x8"):
    tx.update({'w': jnp.zeros((4, 8))}, state)
  with pytest.raises(ValueError, match='initialized for 1 leaves'):
    tx.update({'w': jnp.zeros((4, 6)), 'u': jnp.zeros((4, 6))}, state)


SCRIPT = pathlib.Path(__file__).with_name('normuon_sharding_check.py')
SHARDING_MODES = ('explicit', 'trap')  # all four: run the script by hand


@pytest.mark.slow  # about 30 s on two loaded cores: `pytest -m slow`
def test_eight_devices_equal_one_and_keep_shardings():
  """FSDP-sharded params (kernels split on fan-in, fan-out, input channels,
  layers) on 8 emulated devices, in a process of its own: explicit axes
  with `jax.set_mesh`, and `device_put` params with a plain `jit` (the
  script also runs auto axes and `mesh=`)."""
  path = [str(SCRIPT.parent.parent), os.environ.get('PYTHONPATH')]
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), *SHARDING_MODES],
    env={**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in path if p)},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout)
  assert set(out) == set(SHARDING_MODES)
  for mode, result in out.items():
    assert result['rel_err'] < 1e-5, (mode, result)
    assert result['v_rel_err'] < 1e-5, (mode, result)
    assert result['updates_keep_sharding'], (mode, result)
    assert result['v_keeps_sharding'], (mode, result)
  assert out['explicit']['recompiles'] == 0, out['explicit']
  # v follows the kernels' batch and output axes: split by layer, and like a
  # column-split kernel's columns; replicated for a row-split one.
  for mode in SHARDING_MODES:
    specs = out[mode]['v_specs']
    assert 'fsdp' in specs['stack'] and 'fsdp' in specs['wide'], specs
    assert 'fsdp' not in specs['w'] + specs['conv'], specs
