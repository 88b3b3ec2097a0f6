"""Newton–Schulz orthogonalization: an approximate polar factor by matmuls.

One iteration loop (`iterate`) serves every path. What differs between them
is how the products of a step are computed, an object with the methods of
`LocalProducts`: whole matrices on one device (`LocalProducts`), the same on
the short side's Gram matrix (`GramProducts`), or matrices whose long side is
split over devices (`muon_optax._distributed`).
"""

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from muon_optax import _checks
from muon_optax import _coeffs
from muon_optax import _grouping
from muon_optax import _views

DEFAULT_EPS = 1e-7
PRECONDITIONINGS = ('frobenius', 'spectral', 'aol', 'schatten')

# A matrix whose long side is at least this many times its short side runs
# the iteration on its Gram matrix (`GramProducts`). On 2 CPU cores that
# measured 1.6-2.9x faster from an aspect ratio of 4 and faster already at
# 1.5-2 (benchmarks/README.md); in FLOPs it wins from 1.5.
GRAM_MIN_ASPECT = 2


def default_compute_dtype(backend: str | None = None) -> np.dtype | None:
  """The matmul input dtype used when `compute_dtype=None`.

  GPUs and TPUs run bfloat16 matmuls several times faster than float32 ones,
  and every PyTorch peer runs its Newton–Schulz in bfloat16, so there the
  operands are bfloat16 and the products accumulate in float32. CPUs without
  native bfloat16 gain nothing from it (XLA converts and computes in
  float32, slower and no more accurate; benchmarks/README.md), so the CPU
  default is float32.
  Returns None for "the input's own precision, at least float32".
  """
  backend = backend or jax.default_backend()
  if backend in ('gpu', 'cuda', 'rocm', 'tpu'):
    return np.dtype(jnp.bfloat16)
  return None


def dtypes(
  dtype: Any, compute_dtype: np.dtype | None
) -> tuple[Any, Any, lax.Precision]:
  """(accumulation dtype, operand dtype, precision) for inputs of `dtype`.

  Products accumulate in float32 (float64 and complex inputs in their own
  precision). bfloat16 operands apply to real inputs only.
  """
  if jnp.issubdtype(dtype, jnp.complexfloating):
    acc = jnp.complex128 if dtype == jnp.complex128 else jnp.complex64
    operand = acc
  else:
    acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
    if compute_dtype is None:
      compute_dtype = default_compute_dtype()
    operand = acc if compute_dtype is None else compute_dtype
  # An explicit float32 request means float32 on TPU too, where the default
  # matmul precision would otherwise round the operands to bfloat16.
  precision = (
    lax.Precision.HIGHEST
    if jnp.dtype(operand).itemsize >= 4
    else lax.Precision.DEFAULT
  )
  return acc, operand, precision


class LocalProducts:
  """The products of one step on whole `(..., m, n)` matrices.

  The Gram matrix is that of the short side, `X Xᴴ` when `X` is wide and
  `Xᴴ X` when it is tall, so a tall matrix is never transposed or copied.
  The `a X` term is folded into the small matrix
  (`X <- (a I + b A + c A²) X`), which leaves three matmuls and no full-size
  elementwise pass per step.
  """

  def __init__(self, shape, dtype, compute_dtype):
    *_, m, n = shape
    self.ndim = len(shape)
    self.tall = m > n
    self.k = min(m, n)
    self.acc, self.operand, self.precision = dtypes(dtype, compute_dtype)
    # XLA:CPU cannot run every bfloat16 x bfloat16 -> float32 dot it makes
    # (transposes folded into the dot fail at run time, "Unsupported element
    # type for DotThunk"), and has no native bfloat16 to gain from. There the
    # operands are rounded to the operand dtype and multiplied in the
    # accumulation dtype: the same numbers as a bfloat16 dot accumulating in
    # float32, in a form every CPU dot runs.
    self.round_only = (
      jnp.dtype(self.operand) != jnp.dtype(self.acc)
      and jax.default_backend() == 'cpu'
    )

  def dot(self, a, b, contract):
    batch = tuple(range(self.ndim - 2))
    a, b = a.astype(self.operand), b.astype(self.operand)
    if self.round_only:
      a, b = a.astype(self.acc), b.astype(self.acc)
    return lax.dot_general(
      a,
      b,
      (contract, (batch, batch)),
      precision=self.precision,
      preferred_element_type=self.acc,
    )

  def matmul(self, a, b):
    return self.dot(a, b, ((self.ndim - 1,), (self.ndim - 2,)))

  def start(self, x):
    return x.astype(self.acc)

  def sq_norm(self, x):
    """`‖X‖_F²` of each matrix, shape `(..., 1)`."""
    return jnp.sum(jnp.square(jnp.abs(x)), axis=(-2, -1))[..., None]

  def gram(self, x):
    row, col = self.ndim - 2, self.ndim - 1
    if self.tall:
      return self.dot(jnp.conj(x), x, ((row,), (row,)))  # Xᴴ X
    return self.dot(x, jnp.conj(x), ((col,), (col,)))  # X Xᴴ

  def poly(self, gram, a, b, c):
    """`a I + b A + c A²`."""
    eye = jnp.eye(self.k, dtype=gram.dtype)
    return b * gram + c * self.matmul(gram, gram) + a * eye

  def scale_short(self, x, s):
    """Scales the short side of `x` by `s` of shape `(..., k)` or `(..., 1)`."""
    return x * (s[..., None, :] if self.tall else s[..., :, None])

  def step(self, poly, x, gram, last):
    del gram, last
    x = self.matmul(x, poly) if self.tall else self.matmul(poly, x)
    return x, None

  def finish(self, x):
    return x


class GramProducts(LocalProducts):
  """The same iteration run on the short side's `k x k` Gram matrix.

  With `A = X Xᴴ`, every iterate is `X_i = Q_i X` for a polynomial `Q_i` in
  `A`; all of them commute, so `A_{i+1} = P_i A_i P_i` and
  `Q_{i+1} = P_i Q_i`: `k x k` matmuls only, plus one Gram matrix and one
  final product with the long side. In exact arithmetic this is the plain
  iteration; in float32 it matched it to 1e-6 (1e-4 for a condition number
  of 1e6). It is not used with bfloat16 operands, whose rounding the
  recursion for `A` would accumulate (Dao-AILab/gram-newton-schulz restarts
  it for that reason).
  """

  def start(self, x):
    return (super().start(x), None)

  def sq_norm(self, state):
    return super().sq_norm(state[0])

  def gram(self, state):
    return super().gram(state[0])

  def scale_short(self, state, s):
    return (super().scale_short(state[0], s), state[1])

  def step(self, poly, state, gram, last):
    x, q = state
    q = poly if q is None else self.matmul(poly, q)
    gram = None if last else self.matmul(poly, self.matmul(gram, poly))
    return (x, q), gram

  def finish(self, state):
    x, q = state
    # Q is Hermitian: X Q for a tall X is the plain iterate.
    return self.matmul(x, q) if self.tall else self.matmul(q, x)


def local_products(shape, dtype, plan, compute_dtype) -> LocalProducts:
  """`GramProducts` for rectangular float32 matrices, else `LocalProducts`."""
  products = LocalProducts(shape, dtype, compute_dtype)
  *_, m, n = shape
  if (
    max(m, n) >= GRAM_MIN_ASPECT * products.k
    and len(plan.steps) > 1
    and jnp.dtype(products.operand).itemsize >= 4
  ):
    return GramProducts(shape, dtype, compute_dtype)
  return products


def _precondition_factors(gram, preconditioning, eps, norm_scale):
  """Scale factors of the short side from the Gram matrix `A`."""
  if preconditioning == 'spectral':
    # σ_max² is the largest eigenvalue of the Gram matrix: no SVD of X.
    top = jnp.linalg.eigvalsh(gram)[..., -1:]
    return 1.0 / (norm_scale * jnp.sqrt(jnp.maximum(top, 0.0)) + eps)
  if preconditioning == 'aol':
    # Turbo-Muon (arXiv 2512.04632): D = diag(Σ_j |A_ij|)^(-1/2) makes
    # ‖D X‖₂ <= 1 and D X closer to orthogonal than X / ‖X‖_F.
    rows = jnp.maximum(jnp.sum(jnp.abs(gram), axis=-1), eps)
    return lax.rsqrt(rows) / norm_scale
  # 'schatten': ‖A‖_F = ‖X‖_S4², a tighter bound on σ_max than ‖X‖_F.
  fro = jnp.sqrt(jnp.sum(jnp.square(jnp.abs(gram)), axis=(-2, -1)))
  return lax.rsqrt(jnp.maximum(fro, eps))[..., None] / norm_scale


def iterate(
  x: jax.Array,
  products: Any,
  *,
  plan: _coeffs.NewtonSchulzPlan,
  preconditioning: str,
  eps: jax.typing.ArrayLike,
) -> jax.Array:
  """The Newton–Schulz loop: precondition, then `X <- P(A) X` per step.

  `products` computes the Gram matrix, the step polynomial and its product
  with the iterate (see `LocalProducts`); the loop is the same on one device
  and across a mesh.
  """
  x = products.start(x)
  if preconditioning == 'frobenius':
    s = 1.0 / (plan.norm_scale * jnp.sqrt(products.sq_norm(x)) + eps)
    x, gram = products.scale_short(x, s), None
  else:
    gram = products.gram(x)
    s = _precondition_factors(gram, preconditioning, eps, plan.norm_scale)
    x = products.scale_short(x, s)
    gram = gram * s[..., :, None] * s[..., None, :]
  for i, (a, b, c) in enumerate(plan.steps):
    if gram is None:
      gram = products.gram(x)
    poly = products.poly(gram, a, b, c)
    x, gram = products.step(poly, x, gram, last=i == len(plan.steps) - 1)
  return products.finish(x)


@functools.partial(
  jax.jit, static_argnames=('plan', 'preconditioning', 'compute_dtype')
)
def newton_schulz(
  x: jax.Array,
  eps: jax.typing.ArrayLike = DEFAULT_EPS,
  *,
  plan: _coeffs.NewtonSchulzPlan,
  preconditioning: str = 'frobenius',
  compute_dtype: np.dtype | None = None,
) -> jax.Array:
  """Runs the planned steps on the last two axes of `x`, on one device."""
  products = local_products(x.shape, x.dtype, plan, compute_dtype)
  out = iterate(
    x, products, plan=plan, preconditioning=preconditioning, eps=eps
  )
  return out.astype(x.dtype)


def orthogonalize(
  x: jax.typing.ArrayLike,
  ns_coeffs: _coeffs.NsCoeffs = 'polar_express',
  ns_steps: int | None = None,
  *,
  preconditioning: str = 'frobenius',
  eps: jax.typing.ArrayLike = DEFAULT_EPS,
  compute_dtype: Any = None,
  matrix_views: Any = None,
  group_strategy: str = 'auto',
) -> jax.Array:
  r"""Approximates the polar factor :math:`U V^\top` of a matrix, or a batch.

  For :math:`X = U \Sigma V^\top`, Newton–Schulz applies an odd matrix
  polynomial :math:`p(X) = U p(\Sigma) V^\top` a few times, each a quintic
  :math:`a x + b x^3 + c x^5` of the singular values after a
  preconditioning, so that they are pushed towards 1 using matmuls only. A
  few steps do not give the exact polar factor: the singular values end in a
  band around 1 whose width depends on the coefficients (see the README).
  Complex matrices get :math:`U V^H`.

  Args:
    x: an array with at least two axes. Without `matrix_views`, the last
      two are the matrix and leading axes are a batch, every slice
      orthogonalized on its own.
    ns_coeffs: `'polar_express'` (Amsel et al., per-step optimal triples with
      the paper's safety factor), `'jordan'` (KellerJordan/Muon's fixed
      quintic; `'standard'` is optax's name for it), `'dion'`
      (microsoft/dion's 5-step list), or an array of shape (3,) or (n, 3).
      When n < `ns_steps` the last triple is repeated; when n > `ns_steps`
      the first `ns_steps` triples are used.
    ns_steps: number of Newton–Schulz steps; None is 5 for a preset or one
      triple, n for an (n, 3) array.
    preconditioning: how the input is scaled before the first step, as in
      optax.contrib: `'frobenius'` (:math:`X / \|X\|_F`), `'spectral'`
      (:math:`X / \sigma_{\max}`, from the Gram matrix's top eigenvalue),
      `'aol'` (Turbo-Muon's scaling of the short side by
      :math:`D = \mathrm{diag}(\sum_j |A_{ij}|)^{-1/2}` with :math:`A` the
      Gram matrix, after which the iteration approximates the polar factor
      of :math:`D X`, not quite :math:`X`'s; closer at equal steps on
      ill-conditioned inputs, see the README), or `'schatten'`
      (:math:`X / \|X\|_{S_4}`).
    eps: keeps the scaling finite; a zero matrix gives zeros.
    compute_dtype: dtype of the matmul operands of real inputs; products
      accumulate in at least float32. None picks the backend's default:
      bfloat16 on GPU and TPU, float32 on CPU (which gains nothing from
      bfloat16: benchmarks/README.md).
    matrix_views: a `MatrixView` or optax's `MuonDimensionNumbers` (its
      `dimension_numbers`): which axes of `x` are the matrix's rows and
      columns; the other axes are a batch. The name is `scale_by_muon`'s.
    group_strategy: how a batch of matrices runs: `'auto'` (the backend's
      best), `'stack'`, `'unroll'` or `'map'`, as in `scale_by_muon`.

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

    Boissin et al., `Turbo-Muon: Accelerating Orthogonality-Based
    Optimization with Pre-Conditioning <https://arxiv.org/abs/2512.04632>`_,
    2025.
  """
  _checks.check_matrix_input(x)
  _checks.check_choice(preconditioning, 'preconditioning', PRECONDITIONINGS)
  _checks.check_choice(group_strategy, 'group_strategy', _grouping.STRATEGIES)
  _checks.check_eps(eps)
  plan = _coeffs.resolve_ns_coeffs(ns_coeffs, ns_steps)
  x = jnp.asarray(x)
  ns = functools.partial(
    newton_schulz,
    eps=eps,
    plan=plan,
    preconditioning=preconditioning,
    compute_dtype=_checks.float_dtype(compute_dtype, 'compute_dtype'),
  )
  if matrix_views is not None:
    view = _views.as_matrix_view(matrix_views, '`matrix_views`')
    resolved = view.resolve(x.shape)
    stack = _grouping.run_stack(ns, resolved.to_matrices(x), group_strategy)
    return resolved.from_matrices(stack)
  if x.ndim > 2:
    flat = x.reshape(-1, *x.shape[-2:])
    return _grouping.run_stack(ns, flat, group_strategy).reshape(x.shape)
  return ns(x)
