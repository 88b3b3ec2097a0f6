"""Numerical edge cases end in a documented finite result, misuse in an error.

The policy this file pins down:

- Zero gradients give zero Muon updates (only the weight decay moves the
  weights): `eps` in the Frobenius normalization turns 0 / 0 into 0.
- A NaN or Inf gradient is not filtered: it propagates into that leaf's
  update and momentum, and only that leaf's (every matrix is normalized and
  orthogonalized on its own, also when same-shape matrices are batched).
  Wrap the optimizer in `optax.apply_if_finite` to skip such steps.
- Rank-deficient, thin, tiny and large matrices are orthogonalized to a
  finite result whose nonzero directions have singular values near 1.
- bfloat16 and float16 parameters keep their dtype and stay finite.
- Complex and integer *matrices* that reach Muon are a `TypeError` naming the
  parameter; complex and integer vectors go to AdamW, as in `optax.adamw`.
- Empty trees and None leaves pass through untouched.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax
from tests import reference
from tests.conftest import normal as _normal


def _rng(seed=0):
  return np.random.default_rng(seed)


def _singular_values(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def _params():
  return {
    'a': {'kernel': _normal(16, 24), 'bias': _normal(24, seed=1)},
    'b': {'kernel': _normal(16, 24, seed=2)},  # same shape: one group
    'c': {'kernel': _normal(3, 3, 4, 8, seed=3)},
  }


def _step(tx, params, grads):
  state = tx.init(params)
  return tx.update(grads, state, params)


# Numerical edge cases: a documented finite result.


class TestZeroGradients:
  def test_muon_updates_are_zero(self):
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = _step(muon_optax.muon(0.1), params, zeros)
    for x in jax.tree.leaves(updates):
      assert not np.any(np.asarray(x))
    chex.assert_tree_all_finite(state)

  def test_only_weight_decay_moves_the_weights(self):
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = muon_optax.muon(0.1, weight_decay=0.5)
    updates, _ = _step(tx, params, zeros)
    for path in ('a', 'b', 'c'):
      want = -0.1 * 0.5 * params[path]['kernel']
      np.testing.assert_allclose(updates[path]['kernel'], want, rtol=1e-6)

  def test_eps_zero_gives_nan(self):
    """`eps=0` removes the guard: 0 / 0 is NaN, so keep `eps > 0`."""
    out = muon_optax.orthogonalize(jnp.zeros((4, 4)), eps=0.0)
    assert np.all(np.isnan(np.asarray(out)))


class TestNonFiniteGradients:
  @pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
  @pytest.mark.parametrize('strategy', ['stack', 'unroll'])
  def test_propagates_to_that_leaf_only(self, bad, strategy):
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    grads['a']['kernel'] = grads['a']['kernel'].at[0, 0].set(bad)
    tx = muon_optax.muon(0.1, group_strategy=strategy)
    updates, state = _step(tx, params, grads)
    assert np.all(np.isnan(np.asarray(updates['a']['kernel'])))
    # 'b' shares a group with 'a' under 'stack' and stays finite.
    for path in ('b', 'c'):
      chex.assert_tree_all_finite(updates[path])
    chex.assert_tree_all_finite(updates['a']['bias'])
    momentum = state.inner_states['muon'].inner_state[0].mu
    assert not np.all(np.isfinite(np.asarray(momentum['a']['kernel'])))

  def test_nan_in_an_adam_leaf_stays_there(self):
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    grads['a']['bias'] = grads['a']['bias'].at[3].set(jnp.nan)
    updates, _ = _step(muon_optax.muon(0.1), params, grads)
    assert np.isnan(np.asarray(updates['a']['bias'])[3])
    for path in ('a', 'b', 'c'):
      chex.assert_tree_all_finite(updates[path]['kernel'])

  def test_apply_if_finite_skips_the_step(self):
    params = _params()
    tx = optax.apply_if_finite(muon_optax.muon(0.1), max_consecutive_errors=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    good = jax.tree.map(jnp.ones_like, params)
    _, state = update(good, state, params)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), good)
    updates, new_state = update(bad, state, params)
    for x in jax.tree.leaves(updates):
      assert not np.any(np.asarray(x))
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == 1
    assert not bool(new_state.last_finite)


class TestShapes:
  def test_rank_one(self):
    u, v = _normal(32, 1), _normal(1, 48, seed=1)
    out = muon_optax.orthogonalize(u @ v)
    s = _singular_values(out)
    assert 0.85 < s[0] < 1.13 and s[1] < 1e-3
    # The polar factor of a rank-1 matrix is u vᵀ / (|u| |v|).
    np.testing.assert_allclose(
      np.asarray(out) / s[0],
      np.outer(u[:, 0], v[0]) / (np.linalg.norm(u) * np.linalg.norm(v)),
      atol=1e-4,
    )

  def test_rank_deficient(self):
    x = _normal(40, 5) @ _normal(5, 40, seed=1)  # rank 5 of 40
    s = _singular_values(muon_optax.orthogonalize(x))
    assert np.all(np.isfinite(s))
    assert np.all((s[:5] > 0.85) & (s[:5] < 1.13))
    assert np.all(s[5:] < 1e-3)

  @pytest.mark.parametrize('shape', [(1, 64), (64, 1), (1, 1)])
  def test_vectors_as_matrices(self, shape):
    x = _normal(*shape)
    out = np.asarray(muon_optax.orthogonalize(x))
    np.testing.assert_allclose(out, x / np.linalg.norm(x), rtol=0.13)
    assert 0.85 < np.linalg.norm(out) < 1.13

  @pytest.mark.parametrize('shape', [(1, 64), (64, 1), (2, 2048), (2048, 2)])
  def test_thin_matrices_go_to_adam_by_default(self, shape):
    params = {'w': _normal(*shape)}
    with pytest.warns(UserWarning, match='No parameter is on Muon'):
      assert muon_optax.route(params).labels == {'w': 'adam'}
    with pytest.warns(UserWarning, match='No parameter is on Muon'):
      updates, _ = _step(muon_optax.muon(0.1), params, params)
    chex.assert_tree_all_finite(updates)

  @pytest.mark.parametrize('shape', [(4, 2048), (2048, 4), (1, 1000)])
  def test_extreme_aspect_ratios_in_band(self, shape):
    s = _singular_values(muon_optax.orthogonalize(_normal(*shape)))
    assert np.all((s > 0.85) & (s < 1.13))

  def test_extreme_aspect_ratio_forced_to_muon(self):
    params = {'w': _normal(4, 1024)}
    tx = muon_optax.muon(0.1, param_labels={'w': 'muon'})
    updates, _ = _step(tx, params, params)
    s = _singular_values(updates['w'] / (-0.1 * 0.2 * np.sqrt(1024)))
    assert np.all((s > 0.85) & (s < 1.13))

  def test_two_by_two(self):
    x = jnp.asarray([[2.0, 1.0], [0.5, 3.0]])
    out = muon_optax.orthogonalize(x, ns_coeffs='polar_express', ns_steps=8)
    np.testing.assert_allclose(out, reference.polar_factor(x), atol=1e-2)

  def test_large(self):
    x = _normal(1024, 1024)
    out = muon_optax.orthogonalize(x)
    assert out.shape == (1024, 1024)
    chex.assert_tree_all_finite(out)
    # Singular values from the Gram matrix: several times faster than an SVD.
    gram_sv = lambda a: np.sqrt(
      np.clip(np.linalg.eigvalsh(np.asarray(a, np.float64).T @ a), 0, None)
    )[::-1]
    s, s_in = gram_sv(out), gram_sv(x)
    assert s.max() < 1.13
    # The band is relative to the Frobenius norm, which is what Newton–Schulz
    # normalizes by: a large square Gaussian has sigma_max ~ 0.06 ||X||_F, so
    # 1e-2 sigma_max is below polar_express's design range and lands at ~0.6.
    assert s[s_in >= 1e-3 * np.linalg.norm(s_in)].min() > 0.85

  def test_huge_norm_gives_zeros(self):
    """The sum of squares overflows float32 above a norm of ~1.8e19."""
    out = muon_optax.orthogonalize(jnp.eye(4) * 1e19)
    assert not np.any(np.asarray(out))
    ok = muon_optax.orthogonalize(jnp.eye(4) * 1e18)
    np.testing.assert_allclose(ok, np.eye(4), atol=0.13)

  def test_tiny_norm_is_damped_by_eps(self):
    """Below ||X||_F ~ 1e-9 the eps guard dominates the normalization."""
    out = np.asarray(muon_optax.orthogonalize(jnp.eye(4) * 1e-12))
    chex.assert_tree_all_finite(out)
    assert np.abs(out).max() < 0.02
    ok = muon_optax.orthogonalize(jnp.eye(4) * 1e-6)
    np.testing.assert_allclose(ok, np.eye(4), atol=0.13)

  def test_empty_matrix(self):
    out = muon_optax.orthogonalize(jnp.zeros((0, 4)))
    assert out.shape == (0, 4)


class TestDtypes:
  @pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
  def test_low_precision_params(self, dtype):
    params = jax.tree.map(lambda x: x.astype(dtype), _params())
    tx = muon_optax.muon(0.01, weight_decay=0.1)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(3):
      grads = jax.tree.map(lambda x, i=i: (x * (i + 1)).astype(dtype), params)
      updates, new_state = update(grads, state, params)
      new_params = optax.apply_updates(params, updates)
      chex.assert_trees_all_equal_dtypes(new_params, params)
      chex.assert_trees_all_equal_dtypes(new_state, state)
      chex.assert_tree_all_finite(updates)
      params, state = new_params, new_state

  def test_float16_tiny_gradients_do_not_underflow_to_nan(self):
    g = jnp.full((8, 8), 1e-7, jnp.float16) + jnp.eye(8, dtype=jnp.float16)
    g = g * jnp.float16(1e-4)
    out = muon_optax.orthogonalize(g)
    assert out.dtype == jnp.float16
    chex.assert_tree_all_finite(out)

  def test_complex_vector_goes_to_adam(self):
    params = {'w': _normal(8, 8), 'phase': jnp.ones(4, jnp.complex64)}
    updates, _ = _step(muon_optax.muon(0.1), params, params)
    assert updates['phase'].dtype == jnp.complex64
    chex.assert_tree_all_finite(updates)

  def test_integer_vector_goes_to_adam(self):
    params = {'w': _normal(8, 8), 'step': jnp.arange(4, dtype=jnp.int32)}
    assert muon_optax.route(params).labels['step'] == 'adam'
    updates, _ = _step(muon_optax.muon(0.1), params, params)
    chex.assert_tree_all_finite(updates)


class TestTrees:
  def test_empty_tree(self):
    for tx in (muon_optax.muon(0.1), muon_optax.scale_by_muon()):
      updates, state = _step(tx, {}, {})
      assert updates == {}
      again, next_state = tx.update({}, state, {})
      assert again == {}
      assert jax.tree.structure(next_state) == jax.tree.structure(state)

  def test_none_leaves_pass_through(self):
    params = {'w': _normal(8, 8), 'b': None, 'sub': {'x': None}}
    updates, state = _step(muon_optax.muon(0.1), params, params)
    assert updates['b'] is None and updates['sub']['x'] is None
    chex.assert_tree_all_finite(updates['w'])
    updates, _ = jax.jit(muon_optax.muon(0.1).update)(params, state, params)
    assert updates['b'] is None

  def test_scalar_leaves_go_to_adam(self):
    params = {'w': _normal(8, 8), 'temperature': jnp.float32(1.0)}
    assert muon_optax.route(params).labels['temperature'] == 'adam'
    updates, _ = _step(muon_optax.muon(0.1), params, params)
    assert updates['temperature'].shape == ()


# Misuse: an error at construction or init that names the argument or path.

_P = {'w': jnp.ones((4, 4)), 'b': jnp.ones(4)}
_MATRIX = {'w': jnp.ones((4, 4))}

CONSTRUCTION_ERRORS = [
  # (name, kwargs of muon, error, match)
  ('unknown preset', {'ns_coeffs': 'newton'}, ValueError, "preset 'newton'"),
  (
    'coeffs (2,)',
    {'ns_coeffs': (1.0, 2.0)},
    ValueError,
    r'`ns_coeffs`.*\(2,\)',
  ),
  ('coeffs (2, 4)', {'ns_coeffs': np.ones((2, 4))}, ValueError, r'\(2, 4\)'),
  ('coeffs (0, 3)', {'ns_coeffs': np.ones((0, 3))}, ValueError, 'n >= 1'),
  ('coeffs 3-D', {'ns_coeffs': np.ones((2, 2, 3))}, ValueError, '`ns_coeffs`'),
  (
    'coeffs NaN',
    {'ns_coeffs': (1.0, np.nan, 0.0)},
    ValueError,
    '`ns_coeffs` must be finite',
  ),
  ('coeffs ragged', {'ns_coeffs': [(1, 2, 3), (1, 2)]}, TypeError, 'ns_coeffs'),
  ('coeffs strings', {'ns_coeffs': ['a', 'b', 'c']}, TypeError, 'ns_coeffs'),
  ('zero steps', {'ns_steps': 0}, ValueError, 'ns_steps=0'),
  ('negative steps', {'ns_steps': -3}, ValueError, 'ns_steps=-3'),
  ('float steps', {'ns_steps': 2.5}, TypeError, '`ns_steps`'),
  ('bool steps', {'ns_steps': True}, TypeError, '`ns_steps`'),
  (
    'unknown preconditioning',
    {'preconditioning': 'newton'},
    ValueError,
    '`preconditioning`',
  ),
  ('unknown group', {'group_strategy': 'vmap'}, ValueError, 'group_strategy'),
  ('beta > 1', {'beta': 1.5}, ValueError, 'beta=1.5'),
  ('beta < 0', {'beta': -0.1}, ValueError, 'beta=-0.1'),
  ('int compute', {'compute_dtype': jnp.int8}, TypeError, 'compute_dtype'),
  ('bad compute', {'compute_dtype': 'float99'}, TypeError, 'compute_dtype'),
]


@pytest.mark.parametrize(
  'kwargs, error, match',
  [c[1:] for c in CONSTRUCTION_ERRORS],
  ids=[c[0] for c in CONSTRUCTION_ERRORS],
)
def test_bad_construction_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    muon_optax.muon(0.1, **kwargs)
  with pytest.raises(error, match=match):
    muon_optax.scale_by_muon(**kwargs)


# `muon` forwards these to `scale_by_muon`, which validates them for both.
ALIAS_ERRORS = [
  ('eps string', {'eps': 'tiny'}, TypeError, '`eps` must be a real scalar'),
  ('eps negative', {'eps': -1.0}, ValueError, 'eps=-1.0'),
  ('eps NaN', {'eps': float('nan')}, ValueError, 'eps=nan'),
  (
    'mu_dtype unknown',
    {'mu_dtype': 'float99'},
    TypeError,
    "`mu_dtype`.*'float99'",
  ),
  ('mu_dtype integer', {'mu_dtype': jnp.int8}, TypeError, '`mu_dtype`.*int8'),
]


@pytest.mark.parametrize(
  'kwargs, error, match',
  [c[1:] for c in ALIAS_ERRORS],
  ids=[c[0] for c in ALIAS_ERRORS],
)
def test_bad_alias_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    muon_optax.muon(0.1, **kwargs)
  with pytest.raises(error, match=match):
    muon_optax.scale_by_muon(**kwargs)


INIT_ERRORS = [
  # (name, transformation, params, error, match)
  (
    'integer matrix',
    lambda: muon_optax.muon(0.1),
    {'layer': {'counts': jnp.ones((4, 4), jnp.int32)}},
    TypeError,
    "'layer/counts' has dtype int32",
  ),
  (
    "vector labelled 'muon'",
    lambda: muon_optax.muon(0.1, param_labels={'w': 'muon', 'b': 'muon'}),
    _P,
    ValueError,
    r"'b' of shape \(4,\) reached Muon",
  ),
  (
    'scalar to scale_by_muon',
    lambda: muon_optax.scale_by_muon(),
    {'t': jnp.ones(())},
    ValueError,
    r"'t' of shape \(\) reached Muon",
  ),
  (
    'label tree missing a leaf',
    lambda: muon_optax.muon(0.1, param_labels={'w': 'muon'}),
    _P,
    ValueError,
    "no label for parameter 'b'",
  ),
  (
    'label tree with an extra leaf',
    lambda: muon_optax.muon(
      0.1, param_labels={'w': 'muon', 'b': 'adam', 'c': 'adam'}
    ),
    _P,
    ValueError,
    r"\['c'\] name no parameter",
  ),
  (
    'label tree of another model',
    lambda: muon_optax.muon(0.1, param_labels={'enc': {'w': 'muon'}}),
    _P,
    ValueError,
    "no label for parameter 'b'",
  ),
  (
    'unknown label',
    lambda: muon_optax.muon(0.1, param_labels={'w': 'muon', 'b': 'sgd'}),
    _P,
    ValueError,
    "'b' the label 'sgd'",
  ),
  (
    'label callable returning a bad label',
    lambda: muon_optax.muon(
      0.1, param_labels=lambda p: {'w': 'lion', 'b': 'adam'}
    ),
    _P,
    ValueError,
    "the label 'lion'",
  ),
  (
    'label callable returning one label for a tree of several leaves',
    lambda: muon_optax.muon(0.1, param_labels=lambda p: 'adam'),
    _P,
    TypeError,
    "returned is 'adam', not a tree",
  ),
  (
    'matrix_views entry of the wrong type',
    lambda: muon_optax.scale_by_muon(matrix_views={'w': 'dense'}),
    _MATRIX,
    TypeError,
    "`matrix_views` at 'w'",
  ),
  (
    'matrix_views axis out of range',
    lambda: muon_optax.scale_by_muon(
      matrix_views={'w': muon_optax.MatrixView((0,), (2,))}
    ),
    _MATRIX,
    ValueError,
    "Parameter 'w': .*axis 2, out of range",
  ),
  (
    'matrix_views sharing an axis',
    lambda: muon_optax.scale_by_muon(
      matrix_views=muon_optax.MatrixView((-1,), (1,))
    ),
    _MATRIX,
    ValueError,
    "Parameter 'w': .*shares one",
  ),
  (
    'matrix_views without an output axis',
    lambda: muon_optax.scale_by_muon(
      matrix_views=muon_optax.MatrixView((0,), ())
    ),
    _MATRIX,
    ValueError,
    "Parameter 'w': .*at least one reduction and output axis",
  ),
]


@pytest.mark.parametrize(
  'make, params, error, match',
  [c[1:] for c in INIT_ERRORS],
  ids=[c[0] for c in INIT_ERRORS],
)
def test_bad_params_fail_at_init(make, params, error, match):
  tx = make()
  with pytest.raises(error, match=match):
    tx.init(params)


ROUTING_ERRORS = [
  # (name, call, error, match)
  (
    'override with an unknown label',
    lambda: muon_optax.route(_P, overrides={'w': 'sgd'}).labels,
    ValueError,
    r"`overrides\['w'\]` is 'sgd'",
  ),
  (
    'view override of the wrong type',
    lambda: muon_optax.route(_P, view_overrides={'w': 'dense'}).views,
    TypeError,
    r"`view_overrides\['w'\]` must be a muon_optax.MatrixView",
  ),
  (
    'view override out of range',
    lambda: (
      muon_optax.route(
        _P, view_overrides={'w': muon_optax.MatrixView((2,), (3,))}
      ).views
    ),
    ValueError,
    "Parameter 'w': .*out of range",
  ),
  (
    'min_side 0',
    lambda: muon_optax.route(_P, min_side=0).labels,
    ValueError,
    'min_side=0',
  ),
  (
    'max_aspect below 1',
    lambda: muon_optax.route(_P, max_aspect=0.5).labels,
    ValueError,
    'max_aspect=0.5',
  ),
  (
    'float MatrixView axes',
    lambda: muon_optax.MatrixView((0.5,), (1,)),
    TypeError,
    r'`MatrixView.reduction_axes` .* got \(0.5,\)',
  ),
  (
    'string MatrixView axes',
    lambda: muon_optax.MatrixView((0,), 'out'),
    TypeError,
    "`MatrixView.output_axes` .* got 'out'",
  ),
  (
    'orthogonalize a vector',
    lambda: muon_optax.orthogonalize(jnp.ones(4)),
    ValueError,
    r'`x` must have at least 2 axes.*\(4,\)',
  ),
  (
    'orthogonalize integers',
    lambda: muon_optax.orthogonalize(jnp.ones((4, 4), jnp.int32)),
    TypeError,
    '`x` must be a floating or complex array, got dtype int32',
  ),
]


@pytest.mark.parametrize(
  'call, error, match',
  [c[1:] for c in ROUTING_ERRORS],
  ids=[c[0] for c in ROUTING_ERRORS],
)
def test_bad_routing_and_view_arguments(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_stacked_with_a_module():
  from flax import nnx

  model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='`stacked` is for plain trees'):
    muon_optax.route(model, stacked=('layers',))


@pytest.mark.parametrize('make', [muon_optax.scale_by_muon, muon_optax.muon])
def test_update_with_gradients_of_another_shape_names_the_path(make):
  params = {'layer': {'w': jnp.ones((8, 16)), 'v': jnp.ones((4, 4))}}
  tx = make() if make is muon_optax.scale_by_muon else make(1e-2)
  state = tx.init(params)
  grads = {'layer': {'w': jnp.ones((16, 8)), 'v': jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match=r"'layer/w' has shape \(16, 8\)"):
    tx.update(grads, state, params)


def test_update_with_fewer_gradients_than_params():
  tx = muon_optax.scale_by_muon()
  state = tx.init({'a': jnp.ones((8, 16)), 'b': jnp.ones((8, 16))})
  with pytest.raises(ValueError, match='initialized for 2 leaves'):
    tx.update({'a': jnp.ones((8, 16))}, state)
