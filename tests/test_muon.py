"""`scale_by_muon` and `muon` against NumPy Muon, optax.adamw, optax.contrib."""

import inspect
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax
from tests import reference
from tests.conftest import random_like as _grads


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    'dense': {'kernel': f(24, 40), 'bias': f(40)},
    'tall': {'kernel': f(48, 16)},
    'conv': {'kernel': f(3, 3, 8, 16), 'bias': f(16)},
    'conv1d': {'kernel': f(5, 12, 20)},
    'norm': {'scale': f(40)},
  }


MATRICES = ('dense/kernel', 'tall/kernel', 'conv/kernel', 'conv1d/kernel')


def _flat(tree):
  return {
    '/'.join(str(k.key) for k in kp): x
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.mark.parametrize('nesterov', [True, False])
@pytest.mark.parametrize('consistent_rms', [None, 0.2])
def test_matches_numpy_muon_over_several_steps(nesterov, consistent_rms):
  params = _params()
  lr, wd = 0.02, 0.1
  scaling = 'jordan' if consistent_rms is None else 'rms'
  tx = muon_optax.muon(
    lr,
    ns_coeffs='jordan',
    consistent_rms=consistent_rms,
    nesterov=nesterov,
    weight_decay=wd,
    adam_learning_rate=1e-3,
  )
  ref = reference.NumpyMuon(
    lr, nesterov=nesterov, weight_decay=wd, scaling=scaling
  )
  ref_params = {
    k: np.asarray(v) for k, v in _flat(params).items() if k in MATRICES
  }
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(4):
    grads = _grads(params, step)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ref_params = ref.step(ref_params, {k: _flat(grads)[k] for k in MATRICES})
  for k in MATRICES:
    np.testing.assert_allclose(
      _flat(params)[k], ref_params[k], atol=2e-5, err_msg=k
    )


def test_adam_leaves_match_optax_adamw():
  params = _params()
  tx = muon_optax.muon(
    0.02,
    adam_learning_rate=3e-3,
    adam_b1=0.8,
    adam_b2=0.99,
    adam_eps=1e-6,
    adam_weight_decay=0.01,
  )
  adam = optax.adamw(3e-3, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.01)
  adam_keys = ('dense/bias', 'conv/bias', 'norm/scale')
  adam_params = {k: _flat(params)[k] for k in adam_keys}
  s, sa = tx.init(params), adam.init(adam_params)
  for step in range(3):
    g = _grads(params, step)
    u, s = tx.update(g, s, params)
    ua, sa = adam.update({k: _flat(g)[k] for k in adam_keys}, sa, adam_params)
    params = optax.apply_updates(params, u)
    adam_params = optax.apply_updates(adam_params, ua)
  for k in adam_keys:
    np.testing.assert_allclose(_flat(params)[k], adam_params[k], rtol=1e-6)


def _two_d(params):
  return jax.tree.map(lambda x: 'muon' if x.ndim == 2 else 'adam', params)


# optax.contrib.muon 0.2.8 in one muon_optax call: its coefficients and
# epsilon, width scaling, bias correction, Nesterov in the Adam part and its
# routing (every 2-D leaf). docs/migration.md shows this call.
AS_OPTAX = dict(
  ns_coeffs=(3.4445, -4.7750, 2.0315),
  ns_steps=5,
  beta=0.95,
  eps=1e-8,
  adam_eps=1e-8,
  consistent_rms=None,
  bias_correction=True,
  adam_nesterov=True,
  param_labels=_two_d,
)


@pytest.mark.parametrize('nesterov', [True, False])
def test_one_call_reproduces_optax_contrib_muon(nesterov):
  params = _params()  # 2-D leaves to Muon; the conv kernels and 1-D to Adam
  # optax hands its `nesterov` to the Adam part as well.
  as_optax = {**AS_OPTAX, 'adam_nesterov': nesterov}
  ours = muon_optax.muon(0.01, nesterov=nesterov, **as_optax)
  theirs = optax.contrib.muon(0.01, nesterov=nesterov)
  so, st = ours.init(params), theirs.init(params)
  update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
  for step in range(4):
    g = _grads(params, step)
    uo, so = update_ours(g, so, params)
    ut, st = update_theirs(g, st, params)
    chex.assert_trees_all_close(uo, ut, rtol=2e-5, atol=1e-7)
    params = optax.apply_updates(params, uo)


def test_migration_page_lists_every_default_that_differs():
  """Every argument the two signatures share with another default, and the
  behaviours optax.contrib.muon fixes that are arguments here, have a row in
  docs/migration.md's table of differing defaults."""
  ours = inspect.signature(muon_optax.muon).parameters
  theirs = inspect.signature(optax.contrib.muon).parameters
  differ = {
    name
    for name in set(ours) & set(theirs)
    if ours[name].default != theirs[name].default
  }
  assert differ == {'ns_coeffs', 'ns_steps', 'eps', 'consistent_rms'}
  # optax's fixed behaviours, arguments here: correction, Adam's Nesterov
  # and epsilon, the routing.
  implicit = {'bias_correction', 'adam_nesterov', 'adam_eps', 'param_labels'}
  page = (pathlib.Path(__file__).parents[1] / 'docs/migration.md').read_text()
  table = page.split('## Defaults that differ')[1].split('\n## ')[0]
  rows = {line.split('`')[1] for line in table.splitlines() if '| `' in line}
  assert rows == differ | implicit, rows ^ (differ | implicit)


@pytest.mark.parametrize(
  'nesterov, consistent_rms, preconditioning, adaptive',
  [
    (True, None, 'frobenius', False),
    (False, 0.2, 'frobenius', False),
    (True, 0.2, 'frobenius', True),
    (False, None, 'aol', False),
    (True, 0.2, 'schatten', False),
    (True, None, 'spectral', False),
  ],
)
def test_chain_equals_optax_contrib_building_blocks(
  nesterov, consistent_rms, preconditioning, adaptive
):
  """The migration table's first row: optax's scale_by_muon + scale_by_shape
  is muon_optax's scale_by_muon(bias_correction=True) + scale_by_shape."""
  params = {'a': _params()['dense']['kernel'], 'b': _params()['tall']['kernel']}
  kw = dict(
    nesterov=nesterov, adaptive=adaptive, preconditioning=preconditioning
  )
  dims = {k: optax.contrib.MuonDimensionNumbers() for k in params}
  theirs = optax.chain(
    optax.contrib.scale_by_muon(
      (3.4445, -4.7750, 2.0315),
      5,
      0.9,
      1e-8,
      weight_dimension_numbers=dims,
      **kw,
    ),
    # optax 0.2.8 does not re-export scale_by_shape from optax.contrib.
    optax.contrib._muon.scale_by_shape(dims, consistent_rms=consistent_rms),
  )
  ours = optax.chain(
    muon_optax.scale_by_muon(
      'standard',
      5,
      0.9,
      1e-8,
      bias_correction=True,
      matrix_views=dims,
      **kw,
    ),
    muon_optax.scale_by_shape(dims, consistent_rms=consistent_rms),
  )
  so, st = ours.init(params), theirs.init(params)
  update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
  for step in range(3):
    g = _grads(params, step)
    uo, so = update_ours(g, so, params)
    ut, st = update_theirs(g, st, params)
    # `adaptive` multiplies by a nuclear-norm estimate (~10 here): the float32
    # rounding of both Newton–Schulz runs grows with it.
    top = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ut))
    chex.assert_trees_all_close(uo, ut, atol=2e-5 * max(1.0, top), rtol=2e-5)


@pytest.mark.parametrize('strategy', ['stack', 'unroll', 'map'])
def test_group_strategies_equal_per_leaf(strategy):
  params = {
    'layers': [{'w': x} for x in _params(1)['dense'].values() if x.ndim == 2]
    + [{'w': jnp.ones((24, 40)) * i} for i in range(3)],
    'stacked': jnp.asarray(
      np.random.default_rng(3).standard_normal((4, 24, 40)), jnp.float32
    ),
  }
  views = {'stacked': muon_optax.MatrixView.dense(), 'layers': None}
  tx = muon_optax.scale_by_muon(matrix_views=views, group_strategy=strategy)
  grads = _grads(params, 0)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params))
  for path, g in _flat_any(grads).items():
    per_leaf = muon_optax.scale_by_muon(
      matrix_views=muon_optax.MatrixView.dense()
    )
    want, _ = per_leaf.update(g, per_leaf.init(g))
    np.testing.assert_allclose(
      _flat_any(updates)[path], want, atol=2e-6, err_msg=path
    )


def _flat_any(tree):
  return {
    jax.tree_util.keystr(kp): x
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


class JitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_update_agrees_with_and_without_jit(self):
    params = _params()
    tx = muon_optax.muon(0.01, weight_decay=0.05)
    state = tx.init(params)
    update = self.variant(tx.update)
    g = _grads(params, 0)
    got, _ = update(g, state, params)
    want, _ = jax.jit(tx.update)(g, state, params)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    chex.assert_tree_all_finite(got)


def test_second_update_does_not_recompile():
  params = _params()
  tx = muon_optax.muon(optax.cosine_decay_schedule(0.02, 10))
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  for i in range(3):
    params, state = step(params, state, _grads(params, i))
  assert len(traces) == 1


@pytest.mark.parametrize('mu_dtype', [None, jnp.bfloat16, jnp.float32])
def test_bf16_params_and_mu_dtype_keep_their_dtypes(mu_dtype):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  tx = muon_optax.muon(0.01, mu_dtype=mu_dtype)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(2):
    u, new_state = step(_grads(params, i), state, params)
    new_params = optax.apply_updates(params, u)
    chex.assert_trees_all_equal_dtypes(new_params, params)
    chex.assert_trees_all_equal_dtypes(new_state, state)
    chex.assert_tree_all_finite(u)
    for k in MATRICES:  # Muon hands back updates in the gradients' dtype
      assert _flat(u)[k].dtype == jnp.bfloat16
    params, state = new_params, new_state
  muon_state = state.inner_states['muon'].inner_state[0]
  want = jnp.bfloat16 if mu_dtype is None else mu_dtype
  for x in jax.tree.leaves(muon_state.mu):
    assert x.dtype == want


def test_consistent_rms_sets_the_update_rms():
  """0.2 gives every matrix an update RMS of about 0.2 (AdamW's), whatever
  its shape; that is what lets AdamW's learning rate carry over."""
  params = _params()
  tx = optax.chain(
    muon_optax.scale_by_muon(ns_coeffs=(1.5, -0.5, 0.0), ns_steps=60),
    muon_optax.scale_by_shape(consistent_rms=0.2),
  )
  matrices = {k: v for k, v in _flat(params).items() if k in MATRICES}
  u, _ = tx.update(matrices, tx.init(matrices))
  for k, x in u.items():
    m = x.reshape(-1, x.shape[-1])
    rms = float(jnp.sqrt(jnp.mean(jnp.square(m))))
    want = 0.2 * np.sqrt(max(m.shape)) * np.sqrt(min(m.shape) / m.size)
    np.testing.assert_allclose(rms, want, rtol=1e-3, err_msg=k)
    np.testing.assert_allclose(rms, 0.2, rtol=1e-3, err_msg=k)


def test_converges_on_a_quadratic():
  target = jnp.asarray(
    np.random.default_rng(0).standard_normal((16, 32)), jnp.float32
  )
  params = {'w': jnp.zeros((16, 32))}
  tx = muon_optax.muon(optax.linear_schedule(0.05, 0.0, 300))
  state = tx.init(params)
  loss = lambda p: jnp.sum(jnp.square(p['w'] - target))

  @jax.jit
  def step(params, state):
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for _ in range(300):
    params, state = step(params, state)
  assert float(loss(params)) < 1e-2 * float(loss({'w': jnp.zeros((16, 32))}))


def test_complex_parameters_get_unitary_updates():
  rng = np.random.default_rng(6)
  w = (rng.standard_normal((8, 12)) + 1j * rng.standard_normal((8, 12))).astype(
    np.complex64
  )
  params = {'w': jnp.asarray(w)}
  tx = muon_optax.muon(
    0.1, (2.0, -1.5, 0.5), 40, consistent_rms=None, param_labels={'w': 'muon'}
  )
  u, _ = tx.update(params, tx.init(params), params)
  assert u['w'].dtype == jnp.complex64
  # The first momentum is a multiple of the gradient: the update is
  # -lr * width scale * polar(w).
  scale = np.sqrt(12 / 8)
  np.testing.assert_allclose(
    u['w'], -0.1 * scale * reference.polar_factor(w), atol=1e-5
  )


def test_adaptive_matches_float64_numpy():
  """`adaptive`: each orthogonalized matrix times ⟨U, O⟩, per matrix of the
  view (here a stack of three)."""
  rng = np.random.default_rng(8)
  g = rng.standard_normal((3, 16, 24)).astype(np.float32)
  tx = muon_optax.scale_by_muon(
    'jordan',
    5,
    0.9,
    nesterov=False,
    adaptive=True,
    matrix_views=muon_optax.MatrixView.dense(),
  )
  u, _ = tx.update({'w': g}, tx.init({'w': g}))
  for i in range(3):
    m = 0.1 * g[i].astype(np.float64)  # the first momentum, (1 - beta) G
    o = reference.newton_schulz(m, reference.JORDAN_STEPS)
    np.testing.assert_allclose(
      u['w'][i], np.sum(m * o) * o, rtol=1e-4, atol=1e-5
    )
