"""`muon` inside the pipelines users already have: optax wrappers and Flax."""

import chex
from flax import linen as nn
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax
from tests.conftest import random_like as _grads


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    'dense': {'kernel': f(12, 20), 'bias': f(20)},
    'conv': {'kernel': f(3, 3, 4, 8)},
  }


def _run(tx, params, grads_list):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads_list:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_chain_with_clip_by_global_norm():
  params = _params()
  grads = [jax.tree.map(lambda g: 10.0 * g, _grads(params, i)) for i in (0, 1)]
  chained = optax.chain(optax.clip_by_global_norm(1.0), muon_optax.muon(0.01))
  clipped = [optax.tree.scale(1.0 / optax.tree.norm(g), g) for g in grads]
  got, _ = _run(chained, params, grads)
  want, _ = _run(muon_optax.muon(0.01), params, clipped)
  chex.assert_trees_all_close(got, want, atol=1e-6)


def test_inject_hyperparams_changes_lr_and_wd_without_recompiling():
  params = _params()
  # No static_args: every numeric default is injected, and what shapes the
  # compiled program (ns_steps, preconditioning, ...) defaults to values
  # inject_hyperparams leaves static.
  tx = optax.inject_hyperparams(muon_optax.muon)(
    learning_rate=0.01, weight_decay=0.1, ns_coeffs='jordan'
  )
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    u, state = tx.update(grads, state, params)
    return u, state

  state = tx.init(params)
  _, state = step(params, state, _grads(params, 0))
  state = optax.tree_utils.tree_set(
    state,
    learning_rate=jnp.asarray(0.003, jnp.float32),
    weight_decay=jnp.asarray(0.5, jnp.float32),
  )
  inner = state.inner_state
  g = _grads(params, 1)
  u, state = step(params, state, g)
  assert len(traces) == 1
  # The step used the new values: a fresh muon with them, from the same
  # inner state, gives the same update.
  fresh = muon_optax.muon(0.003, weight_decay=0.5, ns_coeffs='jordan')
  want, _ = fresh.update(g, inner, params)
  chex.assert_trees_all_close(u, want, atol=1e-7)


def test_inject_hyperparams_injects_eps_and_beta():
  params = _params()
  tx = optax.inject_hyperparams(muon_optax.muon)(
    learning_rate=0.01, eps=1e-6, beta=0.9
  )
  state = tx.init(params)
  assert set(state.hyperparams) >= {'eps', 'beta', 'learning_rate'}
  got, _ = jax.jit(tx.update)(params, state, params)
  want, _ = muon_optax.muon(0.01, eps=1e-6, beta=0.9).update(
    params, state.inner_state, params
  )
  chex.assert_trees_all_close(got, want, atol=1e-7)


def test_inject_hyperparams_with_an_explicit_ns_steps_says_what_to_do():
  tx = optax.inject_hyperparams(muon_optax.muon)(learning_rate=0.01, ns_steps=5)
  with pytest.raises(TypeError, match='`ns_steps`.*static_args'):
    tx.init(_params())


def test_multisteps_equals_one_step_on_the_mean_gradient():
  params = _params()
  k = 3
  micro = [_grads(params, i) for i in range(k)]
  mean = jax.tree.map(lambda *g: sum(g) / k, *micro)
  tx = optax.MultiSteps(muon_optax.muon(0.02, weight_decay=0.1), k)
  state = tx.init(params)
  p = params
  for i, g in enumerate(micro):
    u, state = tx.update(g, state, p)
    if i < k - 1:  # accumulation steps leave the params alone
      for x in jax.tree.leaves(u):
        assert not np.any(np.asarray(x))
    p = optax.apply_updates(p, u)
  want, _ = _run(muon_optax.muon(0.02, weight_decay=0.1), params, [mean])
  chex.assert_trees_all_close(p, want, atol=1e-6)


def test_apply_if_finite_run_equals_the_run_without_the_bad_step():
  params = _params()
  g = [_grads(params, i) for i in range(3)]
  nan = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), g[0])
  safe = optax.apply_if_finite(muon_optax.muon(0.01), max_consecutive_errors=5)
  got, state = _run(safe, params, [g[0], nan, g[1], g[2]])
  want, _ = _run(muon_optax.muon(0.01), params, g)
  chex.assert_trees_all_close(got, want, atol=1e-7)
  chex.assert_tree_all_finite(state)
  assert int(state.total_notfinite) == 1


def test_schedules_for_both_learning_rates():
  params = _params()
  muon_lr = optax.linear_schedule(0.02, 0.0, 4)
  adam_lr = optax.exponential_decay(1e-3, 1, 0.5)
  scheduled = muon_optax.muon(muon_lr, adam_learning_rate=adam_lr)
  unit = muon_optax.muon(1.0)
  s, su = scheduled.init(params), unit.init(params)
  for t in range(3):
    g = _grads(params, t)
    u, s = scheduled.update(g, s, params)
    uu, su = unit.update(g, su, params)
    for path, lr in (('conv', muon_lr), ('dense', muon_lr)):
      np.testing.assert_allclose(
        u[path]['kernel'], lr(t) * uu[path]['kernel'], rtol=1e-5, atol=1e-8
      )
    np.testing.assert_allclose(
      u['dense']['bias'], adam_lr(t) * uu['dense']['bias'], rtol=1e-5
    )


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def _data():
  x = jax.random.normal(jax.random.key(1), (32, 8))
  y = jnp.arange(32) % 3
  return x, y


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize('labels', ['module', 'default'])
def test_nnx_optimizer_matches_the_functional_loop(labels):
  model = _MLP(nnx.Rngs(0))
  # nnx.state shares the model's Variables; a clone keeps the initial values.
  graphdef, params0 = nnx.split(nnx.clone(model))
  tx = muon_optax.muon(
    0.01, weight_decay=0.1, param_labels=model if labels == 'module' else None
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: _xent(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  # The same optimizer driven by hand on the pure params tree.
  def loss_fn(params):
    return _xent(nnx.merge(graphdef, params)(x), y)

  @jax.jit
  def functional_step(params, state):
    grads = jax.grad(loss_fn)(params)
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  params, state = params0, tx.init(params0)
  losses = []
  for _ in range(3):
    losses.append(float(train_step(model, optimizer)))
    params, state = functional_step(params, state)
  chex.assert_trees_all_close(
    jax.tree.leaves(nnx.state(model, nnx.Param)),
    jax.tree.leaves(params),
    atol=1e-6,
  )
  assert losses[-1] < losses[0]
  labels = muon_optax.route(model).labels
  assert labels['fc1']['kernel'] == 'muon'
  assert labels['head']['kernel'] == 'adam'


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3, name='head')(x)


def test_linen_train_state_with_injected_schedule():
  model = _LinenMLP()
  x, y = _data()
  params = model.init(jax.random.key(0), x)['params']
  tx = optax.inject_hyperparams(muon_optax.muon)(
    learning_rate=optax.cosine_decay_schedule(0.02, 10), weight_decay=0.01
  )
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=tx
  )
  traces = []

  @jax.jit
  def step(state):
    traces.append(1)
    loss, g = jax.value_and_grad(
      lambda p: _xent(state.apply_fn({'params': p}, x), y)
    )(state.params)
    return state.apply_gradients(grads=g), loss

  losses = []
  for _ in range(4):
    state, loss = step(state)
    losses.append(float(loss))
  assert len(traces) == 1
  assert int(state.step) == 4
  np.testing.assert_allclose(
    state.opt_state.hyperparams['learning_rate'],
    optax.cosine_decay_schedule(0.02, 10)(3),
    rtol=1e-6,
  )
  assert losses[-1] < losses[0]
  chex.assert_tree_all_finite(state.params)
