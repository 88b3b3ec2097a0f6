"""Orbax checkpoints of the optimizer state: a restored run continues exactly."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import muon_optax
from tests.conftest import random_like as _grads


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    'dense': {'kernel': f(12, 20), 'bias': f(20)},
    'conv': {'kernel': f(3, 3, 4, 8)},
    'head': {'kernel': f(20, 3)},
  }


def _optimizers():
  return {
    'muon': muon_optax.muon(
      optax.cosine_decay_schedule(0.02, 10), weight_decay=0.01
    ),
    'inject_hyperparams': optax.inject_hyperparams(
      # A dtype is callable, so inject_hyperparams would take it for a
      # schedule unless it is static.
      muon_optax.muon,
      static_args=('mu_dtype',),
    )(learning_rate=0.02, weight_decay=0.1, mu_dtype=jnp.bfloat16),
    'apply_if_finite': optax.apply_if_finite(muon_optax.muon(0.02), 3),
  }


def _save(path, tree):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)


def _restore(path, like):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract)


@pytest.mark.parametrize('name', sorted(_optimizers()))
def test_restored_run_continues_bit_identically(name, tmp_path):
  tx = _optimizers()[name]
  update = jax.jit(tx.update)

  def train(params, state, steps):
    for t in steps:
      u, state = update(_grads(params, t), state, params)
      params = optax.apply_updates(params, u)
    return params, state

  params, state = train(_params(), tx.init(_params()), range(3))
  _save(tmp_path / 'step3', {'params': params, 'opt_state': state})
  want_params, want_state = train(params, state, range(3, 6))

  # A fresh process would only have the structure: build it from init.
  fresh = {'params': _params(), 'opt_state': tx.init(_params())}
  restored = _restore(tmp_path / 'step3', fresh)
  # MaskedNode / EmptyState / MaskedState survive with the target structure.
  assert jax.tree.structure(restored['opt_state']) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored['opt_state'], state)
  chex.assert_trees_all_equal_dtypes(restored['opt_state'], state)
  got_params, got_state = train(
    restored['params'], restored['opt_state'], range(3, 6)
  )
  chex.assert_trees_all_equal(got_params, want_params)
  chex.assert_trees_all_equal(got_state, want_state)


def test_state_holds_masked_nodes_and_empty_states():
  state = muon_optax.muon(0.1).init(_params())
  kinds = {
    type(x).__name__
    for x in jax.tree.leaves(
      state,
      is_leaf=lambda x: isinstance(x, (optax.MaskedNode, optax.EmptyState)),
    )
  }
  assert {'MaskedNode', 'EmptyState'} <= kinds


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def test_nnx_optimizer_checkpoint(tmp_path):
  x = jax.random.normal(jax.random.key(1), (16, 8))
  y = jnp.arange(16) % 3

  def make():
    model = _MLP(nnx.Rngs(0))
    tx = muon_optax.muon(1e-2, weight_decay=0.01, param_labels=model)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      logits = m(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  model, optimizer = make()
  for _ in range(2):
    step(model, optimizer)
  # The optimizer holds the optimizer state only; the model is saved apart.
  _save(
    tmp_path / 'nnx', {'model': nnx.state(model), 'opt': nnx.state(optimizer)}
  )
  want = [float(step(model, optimizer)) for _ in range(3)]

  model2, optimizer2 = make()
  target = {'model': nnx.state(model2), 'opt': nnx.state(optimizer2)}
  restored = _restore(tmp_path / 'nnx', target)
  nnx.update(model2, restored['model'])
  nnx.update(optimizer2, restored['opt'])
  got = [float(step(model2, optimizer2)) for _ in range(3)]
  assert got == want
  chex.assert_trees_all_equal(
    nnx.state(model2, nnx.Param), nnx.state(model, nnx.Param)
  )
