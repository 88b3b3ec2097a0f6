"""Property-based tests of `orthogonalize` (hypothesis)."""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax.numpy as jnp
import numpy as np

import muon_optax
from tests.test_newton_schulz import BANDS

# Every distinct shape compiles once; keep them few and small.
_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
_SIDES = st.sampled_from([2, 8, 24])
_PRESETS = st.sampled_from(sorted(BANDS))
_MAX = float(np.finfo(np.float32).max)


@st.composite
def _matrices(draw, min_rel=1e-2):
  """X = U diag(s) Vᵀ with random U, V and s in [min_rel, 1] (so that every
  direction is within the range where the presets' bands hold)."""
  m, n = draw(_SIDES), draw(_SIDES)
  seed = draw(st.integers(0, 2**31 - 1))
  k = min(m, n)
  s = draw(
    hnp.arrays(
      np.float64, k, elements=st.floats(min_rel, 1.0, allow_subnormal=False)
    )
  )
  s[0] = 1.0
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  return ((u * s) @ v.T).astype(np.float32), s


def _singular_values(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


@_SETTINGS
@given(_matrices(), st.floats(1e-2, 1e3), _PRESETS)
def test_scale_invariance(xs, c, preset):
  x, _ = xs
  a = muon_optax.orthogonalize(x, ns_coeffs=preset)
  b = muon_optax.orthogonalize(np.float32(c) * x, ns_coeffs=preset)
  np.testing.assert_allclose(a, b, atol=2e-4)


@_SETTINGS
@given(_matrices(), _PRESETS)
def test_transpose_equivariance(xs, preset):
  x, _ = xs
  a = muon_optax.orthogonalize(x, ns_coeffs=preset)
  b = muon_optax.orthogonalize(x.T, ns_coeffs=preset)
  # The Gram matrix differs (X Xᵀ vs Xᵀ X) and float32 round-off is
  # amplified by the polynomial's slope on the smallest directions.
  np.testing.assert_allclose(a, np.asarray(b).T, atol=1e-3)


@_SETTINGS
@given(
  st.lists(st.sampled_from([2, 3]), max_size=2),
  _SIDES,
  _SIDES,
  st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
  st.integers(0, 1000),
)
def test_shape_and_dtype_preserved(batch, m, n, dtype, seed):
  shape = (*batch, m, n)
  x = np.random.default_rng(seed).standard_normal(shape)
  out = muon_optax.orthogonalize(jnp.asarray(x, dtype))
  assert out.shape == shape
  assert out.dtype == dtype
  assert np.all(np.isfinite(np.asarray(out, np.float32)))


@_SETTINGS
@given(_matrices(), _PRESETS)
def test_singular_values_in_the_preset_band(xs, preset):
  x, s_in = xs
  s = _singular_values(muon_optax.orthogonalize(x, ns_coeffs=preset))
  lo, hi = BANDS[preset]
  assert s.min() > lo, (s.min(), s_in.min())
  assert s.max() < hi, s.max()


@_SETTINGS
@given(
  hnp.arrays(
    np.float32,
    st.tuples(_SIDES, _SIDES),
    elements=st.floats(-_MAX, _MAX, width=32),
  ),
  _PRESETS,
)
def test_finite_output_for_any_finite_input(x, preset):
  out = muon_optax.orthogonalize(x, ns_coeffs=preset)
  assert np.all(np.isfinite(np.asarray(out)))
