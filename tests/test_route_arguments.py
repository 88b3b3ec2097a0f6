"""What `param_labels` and `matrix_views` may be, under `muon` and under
`optax.inject_hyperparams(muon)`: every form routes as `muon` routes it, or
fails loudly, never in silence."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax


class _Net(nnx.Module):
  def __init__(self, *, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.classifier = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x)).mean((1, 2))
    return self.classifier(nnx.relu(self.hidden(x)))


@pytest.fixture(scope='module')
def net():
  return _Net(rngs=nnx.Rngs(0))


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _grads(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params
  )


def _updates(tx, params, steps=2):
  state = tx.init(params)
  for step in range(steps):
    updates, state = tx.update(_grads(params, step), state, params)
  return updates


def _is_labelled_muon(tx, params):
  """Which leaves the Muon branch moved: the partition's own masks."""
  inner = tx.init(params)
  while hasattr(inner, 'inner_state'):
    inner = inner.inner_state
  muon_branch = inner.inner_states['muon']
  return jax.tree.map(
    lambda x: not isinstance(x, optax.MaskedNode),
    muon_branch.inner_state[0].mu,
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )


def test_every_label_form_routes_like_the_model(net):
  params = _params(net)
  routing = muon_optax.route(net)
  expected = muon_optax.muon(0.02, param_labels=net)
  want = _updates(expected, params)
  label_tree = nnx.to_pure_dict(routing.labels)
  for form in (routing, label_tree, lambda p: label_tree):
    got = _updates(muon_optax.muon(0.02, param_labels=form), params)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  assert label_tree == {
    'conv': {'kernel': 'muon', 'bias': 'adam'},
    'hidden': {'kernel': 'muon', 'bias': 'adam'},
    'classifier': {'kernel': 'adam', 'bias': 'adam'},  # the head, by name
  }


def test_inject_hyperparams_routes_a_routing_and_a_label_tree_exactly(net):
  params = _params(net)
  routing = muon_optax.route(net)
  want = _updates(muon_optax.muon(0.02, param_labels=routing), params)
  injectable = optax.inject_hyperparams(muon_optax.muon)
  for form in (routing, nnx.to_pure_dict(routing.labels)):
    tx = injectable(learning_rate=0.02, param_labels=form)
    got = _updates(tx, params)  # the injected rate is a float32 array
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      got,
      want,
    )
  # And the same for views: a Routing is plain data, kept static.
  tx = injectable(learning_rate=0.02, matrix_views=routing)
  assert jax.tree.structure(_updates(tx, params)) == jax.tree.structure(params)


def test_inject_hyperparams_with_a_label_function_raises_saying_what_to_pass(
  net,
):
  params = _params(net)
  injectable = optax.inject_hyperparams(muon_optax.muon)
  # optax calls every callable hyperparameter with the step count.
  for fn in (
    lambda p: jax.tree.map(lambda x: 'muon' if x.ndim > 1 else 'adam', p),
    lambda p: muon_optax.route(p).labels,
  ):
    tx = injectable(learning_rate=0.02, param_labels=fn)
    with pytest.raises(TypeError, match='Routing'):
      tx.init(params)
  tx = injectable(
    learning_rate=0.02, matrix_views=lambda p: muon_optax.route(p).views
  )
  with pytest.raises(TypeError, match='Routing'):
    tx.init(params)
  # A model as labels: optax calls the module with the step count, which a
  # Flax module refuses (its own error, before muon_optax sees anything).
  tx = injectable(learning_rate=0.02, param_labels=net)
  with pytest.raises(Exception):  # noqa: B017 (Flax's own error)
    tx.init(params)


def test_normuon_injects_with_a_routing(net):
  params = _params(net)
  routing = muon_optax.route(net)
  want = _updates(muon_optax.normuon(0.02, param_labels=routing), params)
  tx = optax.inject_hyperparams(muon_optax.normuon)(
    learning_rate=0.02, param_labels=routing
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    _updates(tx, params),
    want,
  )


def test_numbers_strings_and_arrays_are_not_label_trees():
  for bad in ('adam', 1, 0.5, jnp.zeros(()), np.zeros(3)):
    with pytest.raises(TypeError, match='not a tree'):
      muon_optax.muon(0.02, param_labels=bad)
    with pytest.raises(TypeError, match='not a tree'):
      muon_optax.muon(0.02, matrix_views=bad)
    with pytest.raises(TypeError, match='not a tree'):
      muon_optax.route(bad)
  # One label for a params tree that is a single array is a whole tree.
  w = jnp.ones((8, 8))
  tx = muon_optax.muon(0.02, param_labels=lambda p: 'muon')
  assert _updates(tx, w).shape == (8, 8)


def test_label_tree_mismatch_names_the_first_path(net):
  params = _params(net)
  labels = nnx.to_pure_dict(muon_optax.route(net).labels)
  del labels['hidden']['bias']
  with pytest.raises(ValueError, match="no label for parameter 'hidden/bias'"):
    muon_optax.muon(0.02, param_labels=labels).init(params)
  extra = nnx.to_pure_dict(muon_optax.route(net).labels)
  extra['hidden']['weight'] = 'muon'
  with pytest.raises(ValueError, match=r"\['hidden/weight'\] name no param"):
    muon_optax.muon(0.02, param_labels=extra).init(params)


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


def test_a_linen_module_anywhere_is_a_type_error_with_the_linen_line():
  model = _LinenNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8)))
  for obj in (model, model.bind(variables)):
    for call, name in (
      (lambda o=obj: muon_optax.route(o), 'The object to route'),
      (lambda o=obj: muon_optax.muon(0.1, param_labels=o), '`param_labels`'),
      (lambda o=obj: muon_optax.muon(0.1, matrix_views=o), '`matrix_views`'),
      (lambda o=obj: muon_optax.describe(o), 'The object to describe'),
    ):
      with pytest.raises(TypeError) as e:
        call()
      assert name in str(e.value) and 'mutable=' in str(e.value)
  # The line it points to works.
  routing = muon_optax.trace_routing(
    lambda p, x: model.apply({'params': p}, x),
    variables['params'],
    jnp.zeros((1, 8)),
  )
  assert routing.labels == {  # Linen names Dense(4) first: built first
    'Dense_0': {'kernel': 'adam', 'bias': 'adam'},  # the head
    'Dense_1': {'kernel': 'muon', 'bias': 'adam'},
  }


def test_route_finishes_again_and_keeps_earlier_options(net):
  routing = muon_optax.route(net, overrides={'hidden': 'adam'})
  assert routing.labels['hidden']['kernel'] == 'adam'
  again = muon_optax.route(routing, head='muon')
  assert again.labels['hidden']['kernel'] == 'adam'  # the override stays
  assert again.labels['classifier']['kernel'] == 'muon'
  assert again.options == {'overrides': {'hidden': 'adam'}, 'head': 'muon'}
  with pytest.raises(ValueError, match='read already'):
    muon_optax.route(routing, stacked=['x'])


def test_a_function_returning_a_routing_must_carry_its_views():
  # A scanned (6, 32, 32) leaf: traced, six 32x32 matrices; by the names
  # rules, one 192x32 guess. A function gives labels only, so it must agree.
  def loss(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p['layers'])
    return (h @ p['head']).sum()

  params = {'layers': jnp.ones((6, 32, 32)), 'head': jnp.ones((32, 4))}
  x = jnp.ones((2, 32))
  traced = lambda p: muon_optax.trace_routing(loss, p, x)
  tx = muon_optax.muon(0.02, param_labels=traced)
  with pytest.raises(ValueError, match=r"\['layers'\] are not the ones"):
    tx.init(params)
  # The two forms it points to both use the traced views.
  for tx in (
    muon_optax.muon(0.02, param_labels=traced(params)),
    muon_optax.muon(0.02, param_labels=traced, matrix_views=traced(params)),
  ):
    tx.init(params)


def test_one_name_is_not_its_characters():
  params = {
    'readout': {'kernel': jnp.ones((16, 10))},
    'e': {'tok': jnp.ones((16, 16))},
    'h': {'kernel': jnp.ones((16, 16))},
  }
  labels = muon_optax.route(params, head_names='readout').labels
  assert labels == {
    'readout': {'kernel': 'adam'},
    'e': {'tok': 'muon'},
    'h': {'kernel': 'muon'},
  }


def test_single_array_and_non_float_leaves_under_the_defaults():
  w = jnp.ones((8, 16))
  tx = muon_optax.muon(1e-3)
  assert tx.update(w, tx.init(w), w)[0].shape == (8, 16)
  # An integer leaf is not Muon's (the sources read floating arrays only).
  params = {'w': w, 'steps': jnp.zeros((), jnp.int32)}
  assert muon_optax.muon(1e-3).init(params) is not None


def test_stacked_pattern_that_matches_nothing():
  with pytest.raises(ValueError, match=r"`stacked` patterns \['layer'\]"):
    muon_optax.route({'layers': jnp.ones((4, 8, 8))}, stacked=['layer'])


def test_describe_refuses_a_non_matrix_on_muon():
  params = {'w': jnp.ones((8, 8)), 'b': jnp.ones(8)}
  with pytest.raises(ValueError, match="'b' of shape \\(8,\\) is labelled"):
    muon_optax.describe(params, {'w': 'muon', 'b': 'muon'})


def test_routing_warnings_point_at_the_callers_line():
  params = {'blocks': {'kernel': jnp.ones((4, 8, 8))}}  # a guessed layout
  with pytest.warns(UserWarning, match='guessed') as record:
    muon_optax.route(params)
  assert record[0].filename == __file__
