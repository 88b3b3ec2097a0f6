"""`scale_by_muon`: momentum, then Newton–Schulz on each matrix view."""

from collections.abc import Callable
import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from muon_optax import _coeffs
from muon_optax import _diagnostics
from muon_optax import _distributed
from muon_optax import _newton_schulz
from muon_optax import _paths
from muon_optax import _routing
from muon_optax import _views
from muon_optax._views import MatrixView

MatrixViews = (
  None | MatrixView | Any | Callable[[optax.Params], Any]
)  # a view for all leaves, a (prefix) tree of views, or a callable to one

GROUP_STRATEGIES = ('auto', 'stack', 'unroll', 'map')


class MuonState(NamedTuple):
  """State of `scale_by_muon`."""

  count: jax.Array  # shape=(), dtype=int32
  momentum: optax.Updates
  # {path: {metric: scalar}} with `diagnostics=True`, else None (no leaves).
  diagnostics: dict[str, dict[str, jax.Array]] | None = None


def default_group_strategy(backend: str | None = None) -> str:
  """How a group of same-shape matrices runs when `group_strategy='auto'`.

  Accelerators gain from one batched call per group (fewer, larger kernels;
  modded-nanogpt and microsoft/dion batch by shape). On CPU (XLA:CPU, 2
  idle cores) one batched Newton–Schulz is slower than plain per-matrix dots,
  and one plain call per matrix lets XLA run independent matrices on
  different cores: on the 12-layer d384 GPT-like tree the full update took
  1042 ms unrolled, 1221 ms as a `lax.map` per group and 1445 ms stacked; on
  the ResNet-18-like tree 47, 51 and 48 ms (benchmarks/README.md). So a
  group is unrolled there.
  """
  backend = backend or jax.default_backend()
  return 'unroll' if backend == 'cpu' else 'stack'


def _check_like_momentum(updates: Any, momentum: Any) -> None:
  """Raises, naming the path, when `updates` do not match the initial params.

  Gradients first appear at `update`; the check is on static shapes, so it
  runs once, when `update` is traced.
  """
  grads = _paths.leaves_with_paths(updates)
  moms = jax.tree.leaves(momentum)
  if len(grads) != len(moms):
    raise ValueError(
      f'scale_by_muon was initialized for {len(moms)} leaves, the updates '
      f'have {len(grads)}: pass gradients shaped like the params given to '
      '`init`.'
    )
  for (path, g), m in zip(grads, moms, strict=True):
    if g.shape != m.shape:
      raise ValueError(
        f'The update at {path!r} has shape {g.shape}, the state was '
        f'initialized for {m.shape}: pass gradients shaped like the params '
        'given to `init`.'
      )


class _Leaf(NamedTuple):
  index: int
  path: str
  view: _views.ResolvedView


def _view_resolver(matrix_views: MatrixViews, tree: Any):
  """A function path, shape -> MatrixView for the leaves of `tree`."""
  if callable(matrix_views) and not isinstance(matrix_views, MatrixView):
    matrix_views = matrix_views(tree)
  if matrix_views is None:
    return lambda path, shape: _routing._shape_view(path, shape)  # pylint: disable=protected-access
  if _views.is_view_leaf(matrix_views):
    view = _views.as_matrix_view(matrix_views, '`matrix_views`')
    return lambda path, shape: view
  lookup = _paths.PathLookup(matrix_views, is_leaf=_views.is_view_leaf)

  def resolve(path, shape):
    view = lookup.get(path)
    if view is None:
      return _routing._shape_view(path, shape)  # pylint: disable=protected-access
    return _views.as_matrix_view(view, f'`matrix_views` at {path!r}')

  return resolve


def resolve_leaves(tree: Any, matrix_views: MatrixViews) -> list[_Leaf]:
  """Binds every array leaf of `tree` to its matrix view, or raises."""
  resolver = _view_resolver(matrix_views, tree)
  leaves = []
  for i, (path, x) in enumerate(_paths.leaves_with_paths(tree)):
    shape = tuple(np.shape(x))
    dtype = getattr(x, 'dtype', None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f'Parameter {path!r} has dtype {dtype}; Muon updates real floating '
        'parameters only. Route it elsewhere with `param_labels`.'
      )
    view = resolver(path, shape)
    if view is None:
      raise ValueError(
        f'Parameter {path!r} of shape {shape} reached Muon but is not a '
        "matrix (Muon needs at least 2 axes). Label it 'adam' with "
        '`param_labels`, or give it a `matrix_views` entry.'
      )
    try:
      resolved = view.resolve(shape)
    except ValueError as e:
      raise ValueError(f'Parameter {path!r}: {e}') from None
    leaves.append(_Leaf(i, path, resolved))
  return leaves


def _orthogonalize_groups(
  mats: list[jax.Array],
  scales: list[float],
  *,
  plan: _coeffs.NewtonSchulzPlan,
  eps: float,
  compute_dtype: np.dtype | None,
  strategy: str,
) -> list[jax.Array]:
  """Orthogonalizes (B, m, n) arrays, grouped by (m, n, dtype, scale)."""
  ns = lambda x, s: _newton_schulz.newton_schulz(
    x, plan=plan, eps=eps, compute_dtype=compute_dtype, scale=s
  )
  groups: dict[tuple, list[int]] = {}
  for i, (x, s) in enumerate(zip(mats, scales, strict=True)):
    groups.setdefault((x.shape[1:], x.dtype, s), []).append(i)
  out: list[Any] = [None] * len(mats)
  for (_, _, s), members in groups.items():
    if strategy == 'unroll':
      for i in members:
        x = mats[i]
        if x.shape[0] == 1:
          out[i] = ns(x[0], s)[None]
        else:
          out[i] = jnp.stack([ns(x[b], s) for b in range(x.shape[0])])
      continue
    stack = jnp.concatenate([mats[i] for i in members], axis=0)
    if stack.shape[0] == 1:  # a lone matrix: plain dots, no batch, no loop
      result = ns(stack[0], s)[None]
    elif strategy == 'stack':
      result = ns(stack, s)
    else:  # 'map'
      result = jax.lax.map(lambda m, s=s: ns(m, s), stack)
    offsets = np.cumsum([0] + [mats[i].shape[0] for i in members])
    for j, i in enumerate(members):
      out[i] = result[offsets[j] : offsets[j + 1]]
  return out


def scale_by_muon(
  *,
  beta: jax.typing.ArrayLike = 0.95,
  nesterov: bool = True,
  ns_coeffs: _coeffs.NsCoeffs = 'polar_express',
  ns_steps: int = 5,
  scaling: str = 'rms',
  eps: float = _newton_schulz.DEFAULT_EPS,
  mu_dtype: jax.typing.DTypeLike | None = None,
  compute_dtype: jax.typing.DTypeLike | None = None,
  matrix_views: MatrixViews = None,
  group_strategy: str = 'auto',
  diagnostics: bool = False,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> optax.GradientTransformation:
  r"""Momentum, orthogonalized by Newton–Schulz, scaled by the matrix shape.

  For every leaf, with gradient :math:`G` and momentum :math:`M`
  (KellerJordan/Muon's form; the EMA has no bias correction since the
  orthogonalization discards the overall scale anyway):

  .. math::
    M &\leftarrow \beta M + (1 - \beta) G \\
    U &\leftarrow \beta M + (1 - \beta) G \quad
       (\text{Nesterov; } U = M \text{ otherwise}) \\
    O &\leftarrow \mathrm{NS}(\mathrm{view}(U)) \cdot s(\text{fan\_in},
       \text{fan\_out})

  where `view` turns the leaf into a matrix or a batch of matrices (see
  `MatrixView`) and :math:`s` is the shape scaling, computed on that matrix:

  - `'rms'` (default): :math:`0.2 \sqrt{\max(\text{fan\_in},
    \text{fan\_out})}`, the update RMS of AdamW (Moonlight), so that AdamW's
    learning rate and weight decay carry over, and `muon` can share one
    learning rate between its Muon and Adam parts. This is why it is the
    default here, while optax.contrib.muon defaults to `'jordan'`.
  - `'jordan'`: :math:`\sqrt{\max(1, \text{fan\_out} / \text{fan\_in})}`
    (KellerJordan/Muon; wants learning rates around 0.02).
  - `'none'`.

  Matrices of the same shape and dtype form a group; `group_strategy` says
  how a group runs: `'stack'` (one batched call), `'unroll'` (one call per
  matrix), `'map'` (`lax.map` over the stack), or `'auto'` (per backend, see
  `default_group_strategy`).

  On a mesh of several devices (`mesh`, or the ambient one of `jax.set_mesh`)
  the Newton–Schulz work is split: every device orthogonalizes a share of
  each group (padded to a multiple of the device count) and large left-over
  matrices are sharded inside the matmuls; updates and state keep the
  parameters' shardings (see the README, "Multi-device and multi-host").
  Without a mesh, or with one device, this is the single-device path.

  Every leaf this transformation receives must have a matrix view: use `muon`
  (or `optax.partition`) to send the others elsewhere.

  Args:
    beta: momentum decay.
    nesterov: use the Nesterov look-ahead.
    ns_coeffs: Newton–Schulz coefficients, see `orthogonalize`.
    ns_steps: number of Newton–Schulz steps.
    scaling: `'rms'`, `'jordan'` or `'none'`.
    eps: added to the Frobenius norm before the first step.
    mu_dtype: dtype of the momentum; None keeps the parameters' dtype.
    compute_dtype: dtype of the matmul operands, see `orthogonalize`.
    matrix_views: None (views from shapes and Linen names, see
      `matrix_views`), one `MatrixView` for every leaf, a tree or prefix tree
      of `MatrixView` / `optax.contrib.MuonDimensionNumbers` / None (default)
      matched by path, or a callable from params to such a tree.
    group_strategy: `'auto'`, `'stack'`, `'unroll'` or `'map'`.
    diagnostics: record, per leaf and step, the orthogonality error of the
      Newton–Schulz output, the momentum norm and the update RMS in
      `MuonState.diagnostics` (read them with `muon_optax.diagnostics`). Off,
      nothing is computed and the field is None.
    mesh: the device mesh to split the Newton–Schulz work over; None uses the
      ambient mesh (`jax.set_mesh`), if any.

  Returns:
    A `GradientTransformation` whose state is a `MuonState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import muon_optax
    >>> params = {'w': jnp.ones((4, 8))}
    >>> tx = optax.chain(muon_optax.scale_by_muon(), optax.scale(-0.01))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.eye(4, 8)}, state)
    >>> updates['w'].shape
    (4, 8)
  """
  plan = _coeffs.resolve_ns_coeffs(ns_coeffs, ns_steps)
  if scaling not in _views.SCALINGS:
    raise ValueError(
      f'Unknown `scaling` {scaling!r}; allowed: {list(_views.SCALINGS)}.'
    )
  if group_strategy not in GROUP_STRATEGIES:
    raise ValueError(
      f'Unknown `group_strategy` {group_strategy!r}; allowed: '
      f'{list(GROUP_STRATEGIES)}.'
    )
  if isinstance(beta, (int, float)) and not 0.0 <= beta <= 1.0:
    raise ValueError(f'`beta` must be in [0, 1], got {beta=}.')
  compute_dtype = _newton_schulz.canonical_float_dtype(compute_dtype)
  mu_dtype = _newton_schulz.canonical_float_dtype(mu_dtype, 'mu_dtype')
  eps = _coeffs.check_eps(eps)
  _distributed.validate_mesh(mesh)

  def init_fn(params):
    resolve_leaves(params, matrix_views)  # raises on a non-matrix leaf
    return MuonState(
      count=jnp.zeros([], jnp.int32),
      momentum=optax.tree.zeros_like(params, dtype=mu_dtype),
      diagnostics=(
        _diagnostics.zero_muon_metrics(params) if diagnostics else None
      ),
    )

  def update_fn(updates, state, params=None):
    del params
    _check_like_momentum(updates, state.momentum)
    momentum = optax.tree.update_moment(updates, state.momentum, beta, 1)
    if nesterov:
      lookahead = optax.tree.update_moment(updates, momentum, beta, 1)
    else:
      lookahead = momentum
    leaves = resolve_leaves(updates, matrix_views)
    flat, treedef = jax.tree.flatten(lookahead)
    grads = jax.tree.leaves(updates)
    mats = [leaf.view.to_matrices(flat[leaf.index]) for leaf in leaves]
    scales = [
      _views.shape_scale(scaling, *leaf.view.matrix_shape) for leaf in leaves
    ]
    strategy = (
      default_group_strategy() if group_strategy == 'auto' else group_strategy
    )
    dist_mesh = _distributed.resolve_mesh(mesh)
    orthogonalize = _orthogonalize_groups
    if dist_mesh is not None:
      orthogonalize = functools.partial(
        _distributed.orthogonalize_groups, mesh=dist_mesh
      )
    orthogonal = orthogonalize(
      mats,
      scales,
      plan=plan,
      eps=eps,
      compute_dtype=compute_dtype,
      strategy=strategy,
    )
    new_flat = list(flat)
    for leaf, o in zip(leaves, orthogonal, strict=True):
      g = grads[leaf.index]
      new_flat[leaf.index] = leaf.view.from_matrices(o).astype(g.dtype)
    if dist_mesh is not None:
      new_flat = _distributed.restore_shardings(new_flat, grads)
    new_updates = jax.tree.unflatten(treedef, new_flat)
    metrics = None
    if diagnostics:
      new_momentum = jax.tree.leaves(momentum)
      metrics = {
        leaf.path: _diagnostics.muon_leaf_metrics(
          o, s, new_momentum[leaf.index]
        )
        for leaf, o, s in zip(leaves, orthogonal, scales, strict=True)
      }
    return new_updates, MuonState(
      count=optax.safe_increment(state.count),
      momentum=optax.tree.cast(momentum, mu_dtype),
      diagnostics=metrics,
    )

  return optax.GradientTransformation(
    init_fn, _distributed.with_auto_axes(update_fn, mesh)
  )
