"""Newton–Schulz orthogonalization: an approximate polar factor by matmuls."""

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from muon_optax import _coeffs

DEFAULT_EPS = 1e-7


def default_compute_dtype(backend: str | None = None) -> np.dtype | None:
  """The matmul input dtype used when `compute_dtype=None`.

  GPUs and TPUs run bfloat16 matmuls several times faster than float32 ones,
  and every PyTorch peer runs its Newton–Schulz in bfloat16, so there the
  operands are bfloat16 and the products accumulate in float32. CPUs without
  native bfloat16 (this project's reference machine) gain nothing from it:
  XLA converts and computes in float32, so the CPU default is float32. There
  bfloat16 operands measured 1.6x slower at 768² and 2.9x at 768x3072 (where
  they also rule out the Gram form), for the same error against the SVD
  polar factor (benchmarks/README.md).
  Returns None for "the input's own precision, at least float32".
  """
  backend = backend or jax.default_backend()
  if backend in ('gpu', 'cuda', 'rocm', 'tpu'):
    return np.dtype(jnp.bfloat16)
  return None


def canonical_float_dtype(
  value: Any, name: str = 'compute_dtype'
) -> np.dtype | None:
  """`value` as a floating NumPy dtype (None stays None), or a TypeError."""
  if value is None:
    return None
  hint = f' {_coeffs.STATIC_HINT}' if hasattr(value, 'shape') else ''
  try:
    dt = np.dtype(value)
  except TypeError as e:
    raise TypeError(
      f'`{name}` must be a floating dtype or None, got {value!r}.{hint}'
    ) from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
      f'`{name}` must be a floating dtype (e.g. jnp.bfloat16 or jnp.float32) '
      f'or None, got {dt}.'
    )
  return dt


def check_matrix_input(x: Any, what: str = '`x`') -> None:
  """Raises unless `x` is a real floating array with at least two axes."""
  shape, dtype = np.shape(x), getattr(x, 'dtype', None)
  if dtype is None:
    dtype = np.asarray(x).dtype
  if len(shape) < 2:
    raise ValueError(
      f'{what} must have at least 2 axes (the last two are the matrix), '
      f'got shape {shape}.'
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f'{what} must be a real floating array, got dtype {dtype}; Muon '
      'orthogonalizes real matrices only.'
    )


@functools.partial(
  jax.jit, static_argnames=('plan', 'eps', 'compute_dtype', 'scale')
)
def newton_schulz(
  x: jax.Array,
  *,
  plan: _coeffs.NewtonSchulzPlan,
  eps: float = DEFAULT_EPS,
  compute_dtype: np.dtype | None = None,
  scale: float = 1.0,
) -> jax.Array:
  """Runs the planned Newton–Schulz steps on the last two axes of `x`.

  Every step is `X <- a X + (b A + c A^2) X` with `A` the Gram matrix of the
  short side: `X Xᵀ` when `X` is wide, `Xᵀ X` when it is tall, so a tall
  matrix is never transposed or copied. The `a X` term is folded into the
  small matrix (`X <- (a I + b A + c A^2) X`), and `scale` into the last
  step, which leaves three matmuls and no full-size elementwise pass per step.

  A rectangular matrix (long side at least `GRAM_MIN_ASPECT` times the short
  one) with float32 operands runs the same iteration on its k x k Gram
  matrix instead (`_gram_newton_schulz`), which touches the long side twice
  rather than twice per step.
  """
  *_, m, n = x.shape
  out_dtype = x.dtype
  acc_dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  if compute_dtype is None:
    compute_dtype = default_compute_dtype()
  operand_dtype = acc_dtype if compute_dtype is None else compute_dtype
  # An explicit float32 request means float32 on TPU too, where the default
  # matmul precision would otherwise round the operands to bfloat16.
  precision = (
    lax.Precision.HIGHEST
    if jnp.dtype(operand_dtype).itemsize >= 4
    else lax.Precision.DEFAULT
  )
  batch = tuple(range(x.ndim - 2))
  row, col = x.ndim - 2, x.ndim - 1
  tall = m > n

  def dot(a, b, contract):
    return lax.dot_general(
      a.astype(operand_dtype),
      b.astype(operand_dtype),
      (contract, (batch, batch)),
      precision=precision,
      preferred_element_type=acc_dtype,
    )

  x = x.astype(acc_dtype)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(row, col), keepdims=True))
  x = x / (plan.norm_scale * norm + eps)
  k = min(m, n)
  eye = jnp.eye(k, dtype=acc_dtype)
  if (
    max(m, n) >= GRAM_MIN_ASPECT * k
    and len(plan.steps) > 1
    and jnp.dtype(operand_dtype).itemsize >= 4
  ):
    return _gram_newton_schulz(x, plan, scale, dot, eye, tall).astype(out_dtype)
  for i, (a, b, c) in enumerate(plan.steps):
    if i == len(plan.steps) - 1:
      a, b, c = a * scale, b * scale, c * scale
    if tall:
      gram = dot(x, x, ((row,), (row,)))  # Xᵀ X, (..., n, n)
    else:
      gram = dot(x, x, ((col,), (col,)))  # X Xᵀ, (..., m, m)
    gram2 = dot(gram, gram, ((col,), (row,)))
    poly = b * gram + c * gram2 + a * eye
    if tall:
      x = dot(x, poly, ((col,), (row,)))  # X P
    else:
      x = dot(poly, x, ((col,), (row,)))  # P X
  return x.astype(out_dtype)


# Measured on 2 CPU cores (benchmarks/README.md): the Gram form is 1.6-2.9x
# faster from an aspect ratio of 4 (384x1536, 1152x128, 768x3072) and even
# at 1.5-2 (512x768, 512x1024); in FLOPs it wins from 1.5 (5 steps:
# 4mmn + 34m^3 against 20mmn + 10m^3 for m <= n).
GRAM_MIN_ASPECT = 2


def _gram_newton_schulz(x, plan, scale, dot, eye, tall):
  """Newton–Schulz on the Gram matrix, applied to `x` once at the end.

  With `G = X Xᵀ` (k x k, k the short side) every iterate is `X_i = Q_i X`
  for a polynomial `Q_i` in `G`, and all of them commute, so
  `A_i = X_i X_iᵀ = Q_i² G` follows from `P_i = a I + b A_i + c A_i²` as
  `A_{i+1} = P_i A_i P_i` and `Q_{i+1} = P_i Q_i`: k x k matmuls only, plus
  one Gram matrix and one final product with the long side. In exact
  arithmetic this is the plain iteration; in float32 it matched it to 1e-6
  (1e-4 for a condition number of 1e6). It is not used with bfloat16
  operands, whose rounding the recursion for `A` would accumulate
  (Dao-AILab/gram-newton-schulz restarts it for that reason).
  """
  row, col = x.ndim - 2, x.ndim - 1
  if tall:
    gram = dot(x, x, ((row,), (row,)))  # Xᵀ X
  else:
    gram = dot(x, x, ((col,), (col,)))  # X Xᵀ
  mm = lambda u, v: dot(u, v, ((col,), (row,)))
  q = None
  for i, (a, b, c) in enumerate(plan.steps):
    last = i == len(plan.steps) - 1
    if last:
      a, b, c = a * scale, b * scale, c * scale
    poly = b * gram + c * mm(gram, gram) + a * eye
    q = poly if q is None else mm(poly, q)
    if not last:
      gram = mm(poly, mm(gram, poly))
  # Q is symmetric: X Q for a tall X is (Q Xᵀ)ᵀ.
  return mm(x, q) if tall else mm(q, x)


def orthogonalize(
  x: jax.typing.ArrayLike,
  *,
  ns_coeffs: _coeffs.NsCoeffs = 'polar_express',
  ns_steps: int = 5,
  eps: float = DEFAULT_EPS,
  compute_dtype: Any = None,
) -> jax.Array:
  r"""Approximates the polar factor :math:`U V^\top` of a matrix, or a batch.

  For :math:`X = U \Sigma V^\top`, Newton–Schulz applies an odd matrix
  polynomial :math:`p(X) = U p(\Sigma) V^\top` a few times, each a quintic
  :math:`a x + b x^3 + c x^5` of the singular values after a Frobenius
  normalization, so that they are pushed towards 1 using matmuls only. A few
  steps do not give the exact polar factor: the singular values end in a band
  around 1 whose width depends on the coefficients (see the README).

  Args:
    x: an array with at least two axes. The last two are the matrix; leading
      axes are a batch and every slice is orthogonalized on its own (one
      batched call on GPU and TPU, a `lax.map` of plain calls on CPU, where
      that measured faster).
    ns_coeffs: `'polar_express'` (Amsel et al., per-step optimal triples with
      the paper's safety factor), `'jordan'` (KellerJordan/Muon's fixed
      quintic), `'dion'` (microsoft/dion's 5-step list), or an array of shape
      (3,) or (n, 3). When n < `ns_steps` the last triple is repeated; when
      n > `ns_steps` the first `ns_steps` triples are used.
    ns_steps: number of Newton–Schulz steps.
    eps: added to the Frobenius norm before dividing; a zero matrix gives
      zeros.
    compute_dtype: dtype of the matmul operands; products accumulate in at
      least float32. None picks the backend's default: bfloat16 on GPU and
      TPU, float32 on CPU (see `default_compute_dtype`).

  Returns:
    An array of `x`'s shape and dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import muon_optax
    >>> g = jax.random.normal(jax.random.key(0), (64, 256))
    >>> o = muon_optax.orthogonalize(g, ns_coeffs='polar_express')
    >>> s = jnp.linalg.svd(o, compute_uv=False)
    >>> bool(0.7 < s.min() and s.max() < 1.2)
    True

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.

    Amsel et al., `The Polar Express: Optimal Matrix Sign Methods and Their
    Application to the Muon Algorithm <https://arxiv.org/abs/2505.16932>`_,
    2025.
  """
  check_matrix_input(x)
  plan = _coeffs.resolve_ns_coeffs(ns_coeffs, ns_steps)
  x = jnp.asarray(x)
  ns = functools.partial(
    newton_schulz,
    plan=plan,
    eps=float(eps),
    compute_dtype=canonical_float_dtype(compute_dtype),
  )
  if x.ndim > 2 and jax.default_backend() == 'cpu':
    # XLA:CPU runs a batched dot slower than a loop of plain ones (12 x 384²:
    # 245 ms stacked, 181 ms mapped, 175 ms unrolled; 48 x 128²: 65, 44,
    # 50 ms); accelerators the other way round. One batch gains nothing from
    # unrolling (unlike a whole tree of groups in `scale_by_muon`), and
    # `lax.map` compiles one body for any batch size.
    flat = x.reshape(-1, *x.shape[-2:])
    return jax.lax.map(ns, flat).reshape(x.shape)
  return ns(x)
