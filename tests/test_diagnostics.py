"""Per-step metrics against NumPy SVD, and `describe`."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax
from tests import reference
from tests.test_routing import ResNet


def _params():
  rng = np.random.default_rng(0)
  return {
    'w': jnp.asarray(rng.standard_normal((12, 20)), jnp.float32),
    'conv': jnp.asarray(rng.standard_normal((3, 3, 8, 6)), jnp.float32),
    'b': jnp.asarray(rng.standard_normal(20), jnp.float32),
  }


def _grads(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), _params()
  )


def test_metrics_match_numpy_and_leave_updates_unchanged():
  params = _params()
  kwargs = dict(weight_decay=0.1, ns_coeffs='jordan', consistent_rms=None)
  plain = muon_optax.muon(0.02, **kwargs)
  traced = muon_optax.muon(0.02, diagnostics=True, **kwargs)
  sp, st = plain.init(params), traced.init(params)
  assert set(muon_optax.diagnostics(st)) == {'w', 'conv', 'b'}
  ref = reference.NumpyMuon(0.02, weight_decay=0.1)
  ref_params = {
    'w': np.asarray(params['w']),
    'conv': np.asarray(params['conv']),
  }
  step_t = jax.jit(traced.update)
  for step in range(3):
    g = _grads(step)
    up, sp = plain.update(g, sp, params)
    ut, st = step_t(g, st, params)
    for k in params:  # enabling the metrics changes no update
      np.testing.assert_allclose(up[k], ut[k], rtol=1e-6, atol=1e-7)
    metrics = muon_optax.diagnostics(st)
    new_ref = ref.step(ref_params, {k: g[k] for k in ref_params})
    for k in ('w', 'conv'):
      u = np.asarray(ref.momentum[k], np.float64)
      u = (1 - ref.beta) * np.asarray(g[k], np.float64) + ref.beta * u
      mat = u.reshape(-1, u.shape[-1])
      o = reference.newton_schulz(mat, reference.JORDAN_STEPS)
      s = np.linalg.svd(o, compute_uv=False)
      want_orth = np.sqrt(np.sum((s**2 - 1) ** 2) / len(s))
      np.testing.assert_allclose(
        metrics[k]['orthogonality_error'], want_orth, rtol=1e-3, err_msg=k
      )
      np.testing.assert_allclose(
        metrics[k]['momentum_norm'], np.linalg.norm(ref.momentum[k]), rtol=1e-5
      )
      applied = np.asarray(new_ref[k]) - np.asarray(ref_params[k])
      w_rms = np.sqrt(np.mean(np.square(np.asarray(params[k], np.float64))))
      np.testing.assert_allclose(
        metrics[k]['update_rms'], np.sqrt(np.mean(applied**2)), rtol=1e-4
      )
      np.testing.assert_allclose(
        metrics[k]['update_to_weight_rms'],
        np.sqrt(np.mean(applied**2)) / w_rms,
        rtol=1e-4,
      )
    np.testing.assert_allclose(
      metrics['b']['update_rms'],
      np.sqrt(np.mean(np.square(ut['b']))),
      rtol=1e-5,
    )
    params = optax.apply_updates(params, ut)
    ref_params = new_ref


def test_orthogonality_error_against_svd():
  x = np.random.default_rng(1).standard_normal((2, 16, 40)).astype(np.float32)
  s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
  want = np.mean(np.sqrt(np.sum((s**2 - 1) ** 2, axis=1) / 16))
  np.testing.assert_allclose(muon_optax.orthogonality_error(x), want, rtol=1e-4)
  exact = reference.polar_factor(x[0])[None].astype(np.float32)
  assert float(muon_optax.orthogonality_error(exact)) < 1e-5


def test_off_means_no_metrics_in_state():
  params = _params()
  state = muon_optax.muon(0.01).init(params)
  assert muon_optax.diagnostics(state) == {}
  muon_state = state.inner_states['muon'].inner_state[0]
  assert muon_state.diagnostics is None


@pytest.mark.slow
def test_metrics_under_nnx_optimizer():
  model = ResNet(rngs=nnx.Rngs(0))
  tx = muon_optax.muon(1e-2, param_labels=model, diagnostics=True)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return muon_optax.diagnostics(optimizer.opt_state)

  metrics = step(model, optimizer)
  assert 0.0 < float(metrics['stem/kernel']['orthogonality_error']) < 0.5
  assert float(metrics['head/kernel']['update_rms']) > 0.0
  assert 'orthogonality_error' not in metrics['head/kernel']


def test_describe_lists_every_leaf():
  model = ResNet(rngs=nnx.Rngs(0))
  table = muon_optax.describe(model)
  lines = table.splitlines()
  assert len(lines) == 1 + 22 + 1
  row = next(ln for ln in lines if ln.startswith('block1/conv2/kernel'))
  assert 'muon' in row and '288x32' in row and '3.394' in row
  row = next(ln for ln in lines if ln.startswith('block1/dw/kernel'))
  assert 'adam' in row and 'depthwise' in row
  assert lines[-1].startswith('muon: 7 leaves')
  stacked = {'layers': jnp.zeros((4, 16, 32))}
  table = muon_optax.describe(muon_optax.route(stacked, stacked=['layers']))
  assert '4x(16x32)' in table
