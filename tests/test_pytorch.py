"""Parity with torch.optim.Muon and KellerJordan's Muon, PyTorch layouts, and
a bfloat16 Newton–Schulz that runs under jit whatever the view.

The references' trajectories were recorded with torch
(`tests/fixtures/make_torch_fixtures.py`); the tests replay them without
torch, through the calls docs/pytorch.md documents.
"""

import json
import math
import pathlib

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax
from muon_optax import MatrixView

FIXTURES = pathlib.Path(__file__).with_name('fixtures') / 'torch_muon.npz'
OUT_IN = MatrixView((-1,), (-2,))  # a torch Linear weight (out, in)
OIHW = MatrixView((-3, -2, -1), (-4,))  # a torch Conv2d weight


@pytest.fixture(scope='module')
def fixtures():
  data = np.load(FIXTURES)
  return json.loads(str(data['meta'])), data


def _views(params):
  return jax.tree.map(lambda x: OIHW if x.ndim == 4 else OUT_IN, params)


def _all_muon(params):
  return jax.tree.map(lambda _: 'muon', params)


def torch_muon(lr, adjust_lr_fn='original', weight_decay=0.1):
  """torch.optim.Muon(lr, weight_decay, adjust_lr_fn=...) on (out, in)
  weights, as docs/pytorch.md writes it."""
  return muon_optax.muon(
    lr,
    ns_coeffs='jordan',
    eps=1e-7,
    weight_decay=weight_decay,
    consistent_rms={'original': None, 'match_rms_adamw': 0.2}[adjust_lr_fn],
    param_labels=_all_muon,
    matrix_views=_views,
  )


def keller_jordan_muon(lr, weight_decay=0.0):
  """KellerJordan/Muon's `Muon(params, lr, weight_decay)` on PyTorch
  layouts, as docs/pytorch.md writes it."""
  return muon_optax.muon(
    lr,
    ns_coeffs='jordan',
    eps=1e-7,
    weight_decay=weight_decay,
    consistent_rms='keller_jordan',
    param_labels=_all_muon,
    matrix_views=_views,
  )


def _replay(tx, w0, grads, recorded):
  params = {'w': jnp.asarray(w0)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update({'w': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, u)
    out.append(np.asarray(params['w']))
  return np.stack(out)[[s - 1 for s in recorded]]


def test_replays_torch_and_keller_jordan_trajectories(fixtures):
  meta, data = fixtures
  assert meta['steps'] >= 10
  worst = {}
  for case in meta['cases']:
    if case['reference'] == 'torch.optim.Muon':
      tx = torch_muon(meta['lr'], case['adjust_lr_fn'], case['weight_decay'])
    else:
      tx = keller_jordan_muon(meta['lr'], case['weight_decay'])
    for shape in case['shapes']:
      w0, grads = data[f'{shape}/w0'], data[f'{shape}/grads']
      want = data[f'{case["case"]}/{shape}']
      got = _replay(tx, w0, grads, meta['recorded_steps'])
      # Relative to the accumulated update, step by step.
      moved = np.linalg.norm((want - w0).reshape(len(want), -1), axis=1)
      err = np.linalg.norm((got - want).reshape(len(want), -1), axis=1)
      worst[case['case'], shape] = float(np.max(err / moved))
  assert max(worst.values()) < 1e-5, {
    k: v for k, v in worst.items() if v > 1e-6
  }
  assert len(worst) == 4 * 3 + 2 * 5


def test_keller_jordan_conv_factor_on_a_stem():
  """(64, 3, 3, 3): KellerJordan's code scales by √max(1, 3/3) = 1; width
  scaling on the (27, 64) view by √(64/27) = 1.54."""
  params = {'stem': jnp.ones((64, 3, 3, 3))}
  o = {'stem': jnp.ones((64, 3, 3, 3))}
  kj = muon_optax.scale_by_shape(OIHW, 'keller_jordan')
  width = muon_optax.scale_by_shape(OIHW, None)
  a, _ = kj.update(o, kj.init(params))
  b, _ = width.update(o, width.init(params))
  assert float(a['stem'][0, 0, 0, 0]) == 1.0
  np.testing.assert_allclose(b['stem'][0, 0, 0, 0], math.sqrt(64 / 27))
  with pytest.raises(ValueError, match='consistent_rms'):
    muon_optax.scale_by_shape(OIHW, 'kellerjordan')


def _torch_style_forward(p, x):
  """A PyTorch-style model: (out, in) Linear weights used as x @ W.T, OIHW
  convs."""
  dn = ('NCHW', 'OIHW', 'NCHW')
  h = lax.conv_general_dilated(
    x, p['conv1.weight'], (1, 1), 'SAME', dimension_numbers=dn
  )
  h = jax.nn.relu(h + p['conv1.bias'][None, :, None, None])
  h = lax.conv_general_dilated(
    h, p['layer1.0.conv.weight'], (1, 1), 'SAME', dimension_numbers=dn
  )
  h = jax.nn.relu(h).mean((2, 3))
  h = jax.nn.relu(h @ p['fc1.weight'].T + p['fc1.bias'])
  return h @ p['head.weight'].T


def test_state_dict_names_route_as_the_traced_forward():
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {
    'conv1.weight': s(16, 3, 3, 3),
    'conv1.bias': s(16),
    'layer1.0.conv.weight': s(32, 16, 3, 3),
    'fc1.weight': s(64, 32),
    'fc1.bias': s(64),
    'head.weight': s(10, 64),
  }
  named = muon_optax.route(params).by_path()
  traced = muon_optax.trace_routing(
    _torch_style_forward, params, s(2, 3, 8, 8)
  ).by_path()
  for path, rule in named.items():
    assert rule.label == traced[path].label, path
    if rule.view is not None and rule.label == 'muon':
      shape = params[path].shape
      a, b = rule.view.resolve(shape), traced[path].view.resolve(shape)
      assert a.matrix_shape == b.matrix_shape, path
  assert named['conv1.weight'].view.resolve((16, 3, 3, 3)).matrix_shape == (
    27,
    16,
  )
  assert named['head.weight'].label == 'adam'


# -- bfloat16 under jit: every orientation, every group strategy -----------

VIEWS = {
  '(in, out)': ((24, 40), MatrixView.dense()),
  '(out, in)': ((40, 24), OUT_IN),
  'HWIO': ((3, 3, 8, 16), MatrixView.conv(2)),
  'OIHW': ((16, 8, 3, 3), OIHW),
  'stacked': ((3, 24, 40), MatrixView.dense()),
  'head axes': ((32, 4, 8), MatrixView.general(1, 2)),
  'square (out, in)': ((32, 32), OUT_IN),
}


@pytest.mark.parametrize('strategy', ['stack', 'unroll', 'map'])
@pytest.mark.parametrize('name', sorted(VIEWS))
def test_bfloat16_runs_under_jit_and_stays_near_float32(name, strategy):
  shape, view = VIEWS[name]
  rng = np.random.default_rng(0)
  # Two same-shape leaves, so that 'stack' and 'map' batch them.
  params = {
    k: jnp.asarray(rng.standard_normal(shape), jnp.float32) for k in 'ab'
  }
  grads = {
    k: jnp.asarray(rng.standard_normal(shape), jnp.float32) for k in 'ab'
  }
  out = {}
  for dtype in (jnp.bfloat16, jnp.float32):
    tx = muon_optax.scale_by_muon(
      compute_dtype=dtype, matrix_views=view, group_strategy=strategy
    )
    out[dtype], _ = jax.jit(tx.update)(grads, tx.init(params))
  for k in 'ab':
    bf16, f32 = (
      np.asarray(out[jnp.bfloat16][k]),
      np.asarray(out[jnp.float32][k]),
    )
    assert bf16.dtype == np.float32  # the update keeps the gradient's dtype
    rel = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert rel < 0.05, (name, strategy, rel)


def test_bfloat16_muon_and_orthogonalize_on_pytorch_layouts():
  rng = np.random.default_rng(1)
  params = {
    'fc.weight': jnp.asarray(rng.standard_normal((48, 32)), jnp.float32),
    'conv.weight': jnp.asarray(rng.standard_normal((16, 8, 3, 3)), jnp.float32),
  }
  tx = muon_optax.muon(0.02, compute_dtype=jnp.bfloat16, param_labels=_all_muon)
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert all(np.all(np.isfinite(np.asarray(u))) for u in updates.values())
  o = jax.jit(
    lambda x: muon_optax.orthogonalize(
      x, 'jordan', compute_dtype=jnp.bfloat16, matrix_views=OUT_IN
    )
  )(params['fc.weight'])
  assert o.shape == (48, 32)


def test_bfloat16_error_against_the_svd_polar_factor(fixtures):
  """Ours in bfloat16 next to torch's and KellerJordan's bfloat16
  Newton–Schulz (recorded), on the same matrices, same quintic, 5 steps."""
  meta, data = fixtures
  for name, theirs in meta['polar_errors'].items():
    x = data[f'polar/{name}']
    u, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    polar = u @ vt
    ours = {}
    for dtype in ('bfloat16', 'float32'):
      o = jax.jit(
        lambda x, d=dtype: muon_optax.orthogonalize(
          x, 'jordan', compute_dtype=jnp.dtype(d)
        )
      )(x)
      ours[dtype] = np.linalg.norm(o - polar) / np.linalg.norm(polar)
    # Same algorithm: float32 agrees with torch's float32 run; bfloat16
    # rounding moves the error by no more than theirs does.
    np.testing.assert_allclose(
      ours['float32'], theirs['torch_float32'], rtol=1e-3
    )
    spread = abs(theirs['torch_bfloat16'] - theirs['torch_float32'])
    assert abs(ours['bfloat16'] - ours['float32']) <= 2 * spread + 0.01, name
