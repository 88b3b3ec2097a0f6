"""`scale_by_muon` (momentum, then Newton–Schulz) and `scale_by_shape`."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from muon_optax import _binding
from muon_optax import _checks
from muon_optax import _coeffs
from muon_optax import _distributed
from muon_optax import _grouping
from muon_optax import _metrics
from muon_optax import _newton_schulz
from muon_optax import _paths
from muon_optax import _views


class MuonState(NamedTuple):
  """State of `scale_by_muon`: `count` and `mu` as in optax.contrib's.

  optax.contrib's third field, `ns_coeffs`, is not here: the coefficients
  are compile-time constants of the transformation, not state (a checkpoint
  of one does not restore into the other). `diagnostics` holds the metrics
  of `diagnostics=True`, `{path: {metric: scalar}}`, and is None (no leaves)
  without it.
  """

  count: jax.Array  # shape=(), dtype=int32
  mu: optax.Updates
  diagnostics: dict[str, dict[str, jax.Array]] | None = None


def _check_like_momentum(updates: Any, mu: Any) -> None:
  """Raises, naming the path, when `updates` do not match the initial params.

  Gradients first appear at `update`; the check is on static shapes, so it
  runs once, when `update` is traced.
  """
  grads = _paths.leaves_with_paths(updates)
  moms = jax.tree.leaves(mu)
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


def _local_group_runner(ns, group_strategy: str) -> _grouping.RunGroup:
  """How one group runs on one device (`_grouping.strategy`)."""

  def run(mats):
    count = sum(x.shape[0] for x in mats)
    if _grouping.strategy(group_strategy, count) == 'unroll':
      # One plain call per matrix, in its own orientation: no transposes.
      return [_grouping.run_stack(ns, x, 'unroll') for x in mats]
    stack = _grouping.stack_wide(mats)
    return _grouping.split_wide(
      _grouping.run_stack(ns, stack, group_strategy), mats
    )

  return run


def _lookahead(updates, mu, count, beta, *, nesterov, bias_correction):
  """What is orthogonalized: the momentum, or its Nesterov look-ahead."""
  if not bias_correction:
    if nesterov:
      return optax.tree.update_moment(updates, mu, beta, 1)
    return mu
  # optax.contrib's form: both terms corrected, the momentum one step ahead.
  if not nesterov:
    return optax.tree.bias_correction(mu, beta, count)
  m_next = optax.tree.bias_correction(mu, beta, optax.safe_increment(count))
  g_hat = optax.tree.bias_correction(updates, beta, count)
  return jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, m_next, g_hat)


def _adaptive_scale(o: jax.Array, u: jax.Array) -> jax.Array:
  """`⟨U, O⟩ O` per matrix: O scaled by a nuclear-norm estimate of U."""
  dual = jnp.sum(jnp.conj(u.astype(o.dtype)) * o, axis=(-2, -1), keepdims=True)
  return dual * o


def scale_by_muon(
  ns_coeffs: _coeffs.NsCoeffs = 'polar_express',
  ns_steps: int | None = None,
  beta: jax.typing.ArrayLike = 0.95,
  eps: jax.typing.ArrayLike = _newton_schulz.DEFAULT_EPS,
  mu_dtype: jax.typing.DTypeLike | None = None,
  *,
  nesterov: bool = True,
  adaptive: bool = False,
  preconditioning: str = 'frobenius',
  bias_correction: bool = False,
  compute_dtype: jax.typing.DTypeLike | None = None,
  matrix_views: _binding.MatrixViews = None,
  group_strategy: str = 'auto',
  diagnostics: bool = False,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> optax.GradientTransformation:
  r"""Momentum, orthogonalized by Newton–Schulz on each matrix view.

  For every leaf, with gradient :math:`G` and momentum :math:`M`:

  .. math::
    M &\leftarrow \beta M + (1 - \beta) G \\
    U &\leftarrow \beta M + (1 - \beta) G \quad
       (\text{Nesterov; } U = M \text{ otherwise}) \\
    O &\leftarrow \mathrm{NS}(\mathrm{view}(U))

  where `view` turns the leaf into a matrix or a batch of matrices (see
  `MatrixView`). Like optax.contrib's `scale_by_muon`, no shape scaling is
  applied: chain `scale_by_shape` (as `muon` does).

  The momentum is KellerJordan/Muon's, without bias correction. Without
  Nesterov the correction is a scalar per step, which the normalization
  before Newton–Schulz removes; with Nesterov it also changes the mix of
  :math:`M` and :math:`G` in the first steps (about :math:`1/(1-\beta)`
  of them). optax.contrib's `scale_by_muon` corrects: `bias_correction=True`
  gives its updates exactly.

  Matrices of the same shape and dtype form a group; `group_strategy` says
  how a group runs: `'stack'` (one batched call), `'unroll'` (one call per
  matrix), `'map'` (`lax.map` over the stack), or `'auto'` (per backend:
  `'stack'` on accelerators; on CPU `'unroll'`, or `'map'` for long stacks).

  On a mesh of several devices the Newton–Schulz work is split: every device
  orthogonalizes a share of each group and large left-over matrices are
  sharded inside the matmuls; updates and state keep the parameters'
  shardings (see docs/index.md, "Multi-device and multi-host"). The mesh is
  `mesh`, else the ambient one (`jax.set_mesh`), else the one in the
  updates' types (explicit mesh axes, `jax.make_mesh`'s default). With auto
  axes and neither `mesh` nor an ambient mesh, types carry no mesh: XLA
  partitions the update itself.

  Every leaf this transformation receives must have a matrix view: use `muon`
  (or `optax.partition`) to send the others elsewhere.

  Args:
    ns_coeffs: Newton–Schulz coefficients, see `orthogonalize`.
    ns_steps: number of Newton–Schulz steps, see `orthogonalize`.
    beta: momentum decay.
    eps: keeps the Newton–Schulz input scaling finite.
    mu_dtype: dtype of the momentum; None keeps the parameters' dtype.
    nesterov: use the Nesterov look-ahead.
    adaptive: multiply each orthogonalized matrix :math:`O` by
      :math:`\langle U, O \rangle`, an estimate of the nuclear norm of
      :math:`U` (PolarGrad; optax.contrib's `adaptive`, which takes the
      inner product over the whole leaf: here it is per matrix of the view,
      the same for a leaf that is one matrix).
    preconditioning: `'frobenius'`, `'spectral'`, `'aol'` or `'schatten'`,
      see `orthogonalize`.
    bias_correction: Adam-style bias correction of the momentum (optax's
      form; see above).
    compute_dtype: dtype of the matmul operands, see `orthogonalize`.
    matrix_views: None (an Equinox module's views from its layer types,
      else from shapes and names, see `muon_optax.route`), one
      `MatrixView` for every leaf, a tree or prefix tree of `MatrixView` /
      `optax.contrib.MuonDimensionNumbers` / None (default) matched by path,
      a callable from params to such a tree, or a `Routing`.
    group_strategy: `'auto'`, `'stack'`, `'unroll'` or `'map'`.
    diagnostics: record, per leaf and step, the orthogonality error of the
      Newton–Schulz output, the momentum norm and the output's RMS in
      `MuonState.diagnostics` (read them with `muon_optax.diagnostics`). Off,
      nothing is computed and the field is None.
    mesh: the device mesh to split the Newton–Schulz work over; None uses the
      ambient mesh (`jax.set_mesh`), else the updates' (explicit axes).

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
  _checks.check_choice(group_strategy, 'group_strategy', _grouping.STRATEGIES)
  _checks.check_choice(
    preconditioning, 'preconditioning', _newton_schulz.PRECONDITIONINGS
  )
  _checks.check_scalar(beta, 'beta', low=0.0, high=1.0)
  _checks.check_eps(eps)
  compute_dtype = _checks.float_dtype(compute_dtype, 'compute_dtype')
  mu_dtype = _checks.float_dtype(mu_dtype, 'mu_dtype')
  _distributed.check_mesh(mesh)

  def init_fn(params):
    _binding.bind_views(params, matrix_views)  # raises on a non-matrix leaf
    return MuonState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      diagnostics=(
        {
          path: _metrics.zeros(_metrics.MUON_METRICS)
          for path, _ in _paths.leaves_with_paths(params)
        }
        if diagnostics
        else None
      ),
    )

  def update_fn(updates, state, params=None):
    del params
    _check_like_momentum(updates, state.mu)
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = optax.safe_increment(state.count)
    lookahead = _lookahead(
      updates,
      mu,
      count,
      beta,
      nesterov=nesterov,
      bias_correction=bias_correction,
    )
    leaves = _binding.bind_views(updates, matrix_views)
    flat, treedef = jax.tree.flatten(lookahead)
    grads = jax.tree.leaves(updates)
    mats = [leaf.view.to_matrices(flat[leaf.index]) for leaf in leaves]

    def ns(x):
      return _newton_schulz.newton_schulz(
        x,
        eps,
        plan=plan,
        preconditioning=preconditioning,
        compute_dtype=compute_dtype,
      )

    dist_mesh = _distributed.work_mesh(mesh, updates)
    if dist_mesh is None:
      run_group = _local_group_runner(ns, group_strategy)
    else:
      run_group = _distributed.mesh_group_runner(
        dist_mesh,
        plan=plan,
        preconditioning=preconditioning,
        eps=eps,
        compute_dtype=compute_dtype,
        local_ns=lambda x: _grouping.run_stack(ns, x, group_strategy),
      )
    orthogonal = _grouping.orthogonalize_groups(mats, run_group)
    if adaptive:
      orthogonal = [
        _adaptive_scale(o, u) for o, u in zip(orthogonal, mats, strict=True)
      ]
    new_flat = list(flat)
    for leaf, o in zip(leaves, orthogonal, strict=True):
      g = grads[leaf.index]
      new_flat[leaf.index] = leaf.view.from_matrices(o).astype(g.dtype)
    if dist_mesh is not None:
      new_flat = _distributed.restore_shardings(new_flat, grads)
    metrics = None
    if diagnostics:
      moments = jax.tree.leaves(mu)
      metrics = {
        leaf.path: _metrics.muon_metrics(o, moments[leaf.index])
        for leaf, o in zip(leaves, orthogonal, strict=True)
      }
    return jax.tree.unflatten(treedef, new_flat), MuonState(
      count=count,
      mu=optax.tree.cast(mu, mu_dtype),
      diagnostics=metrics,
    )

  return optax.GradientTransformation(
    init_fn, _distributed.with_auto_axes(update_fn, mesh)
  )


def scale_by_shape(
  matrix_views: _binding.MatrixViews = None,
  consistent_rms: jax.typing.ArrayLike | str | None = 0.2,
) -> optax.GradientTransformation:
  r"""Scales each leaf's update by a factor of its matrix view's shape.

  With the view's `(fan_in, fan_out)`:

  - `consistent_rms` a number (default 0.2):
    :math:`\text{consistent\_rms} \cdot \sqrt{\max(\text{fan\_in},
    \text{fan\_out})}`, which gives an orthogonalized update the RMS of an
    AdamW update (Moonlight), so AdamW's learning rate and weight decay carry
    over;
  - `consistent_rms=None`: :math:`\sqrt{\max(1, \text{fan\_out} /
    \text{fan\_in})}`, width scaling on the matrix (torch.optim.Muon's
    `'original'`, and KellerJordan's for 2-D weights);
  - `consistent_rms='keller_jordan'`: :math:`\sqrt{\max(1, A / B)}` for the
    leaf's last two axes A, B, exactly what KellerJordan/Muon's code
    computes on the raw gradient: `(out, in)` for a PyTorch 2-D weight (the
    same as None), but `(kh, kw)` for an `(out, in, kh, kw)` conv filter, 1
    for square kernels (None gives the filter's
    :math:`\sqrt{\max(1, \text{out} / (\text{in} \cdot kh \cdot kw))}`).
    For reproducing his runs; it assumes PyTorch layouts.

  optax.contrib's `scale_by_shape` does the first two with
  `weight_dimension_numbers` and defaults to None; the fan-in and fan-out
  here are those of the matrix view (a conv kernel's `prod(spatial)·in` and
  `out`), never of the raw leaf shape.

  Args:
    matrix_views: as in `scale_by_muon`.
    consistent_rms: the target RMS factor, None for width scaling, or
      `'keller_jordan'`.

  Returns:
    A stateless `GradientTransformation`.
  """
  if isinstance(consistent_rms, str):
    _checks.check_choice(
      consistent_rms, 'consistent_rms', (_views.KELLER_JORDAN,)
    )
  elif consistent_rms is not None:
    _checks.check_scalar(consistent_rms, 'consistent_rms', low=0.0, high=1e6)

  def init_fn(params):
    _binding.bind_views(params, matrix_views)  # raises on a non-matrix leaf
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    flat, treedef = jax.tree.flatten(updates)
    for leaf in _binding.bind_views(updates, matrix_views):
      scale = _views.shape_scale(leaf.view, consistent_rms)
      u = flat[leaf.index]
      flat[leaf.index] = (u * scale).astype(u.dtype)
    return jax.tree.unflatten(treedef, flat), state

  return optax.GradientTransformation(init_fn, update_fn)
