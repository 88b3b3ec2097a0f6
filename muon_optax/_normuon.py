"""`scale_by_normuon`: NorMuon's per-neuron normalization of Muon's output."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from muon_optax import _binding
from muon_optax import _checks
from muon_optax import _distributed
from muon_optax import _views

DEFAULT_B2 = 0.95
DEFAULT_EPS = 1e-8


class NorMuonState(NamedTuple):
  """State of `scale_by_normuon`.

  `v` has the structure of the params; each leaf holds the second moment of
  every output neuron of every matrix of the leaf's view, shape
  `(num_matrices, fan_out)`, in float32 or wider.
  """

  count: jax.Array  # shape=(), dtype=int32
  v: optax.Updates


def _v_dtype(dtype: Any) -> np.dtype:
  """Float32 for low-precision params, the (real) params' dtype if wider."""
  real = jnp.finfo(dtype).dtype  # complex64 -> float32
  return np.dtype(jnp.promote_types(real, jnp.float32))


def _v_spec(
  spec: jax.sharding.PartitionSpec, view: _views.ResolvedView
) -> jax.sharding.PartitionSpec:
  """`v`'s layout from the leaf's: its batch and output axes', where each
  is a single axis (more would merge split axes), else replicated."""
  spec = tuple(spec) + (None,) * (len(view.shape) - len(spec))
  one = lambda axes: spec[axes[0]] if len(axes) == 1 else None
  return jax.sharding.PartitionSpec(one(view.batch_axes), one(view.output_axes))


def _zeros_v(x: Any, view: _views.ResolvedView) -> jax.Array:
  """The initial `(num_matrices, fan_out)` moment of the leaf `x`.

  Laid out like `x`'s batch and output axes when `x` is laid out over
  several devices (`device_put` with a `NamedSharding`, or explicit mesh
  axes inside `jit`): stacked layers split by layer, a column-split
  kernel's neurons like its columns (their means need no communication),
  a row-split (FSDP) kernel's replicated.
  """
  shape = (view.num_matrices, view.fan_out)
  dtype = _v_dtype(x.dtype)
  if isinstance(x, jax.core.Tracer):
    spec = _v_spec(jax.typeof(x).sharding.spec, view)
    if any(spec):  # explicit mesh axes
      return jnp.zeros(shape, dtype, out_sharding=spec)
    return jnp.zeros(shape, dtype)
  sharding = getattr(x, 'sharding', None)
  if (
    isinstance(sharding, jax.sharding.NamedSharding)
    and len(sharding.device_set) > 1
  ):
    layout = jax.sharding.NamedSharding(
      sharding.mesh, _v_spec(sharding.spec, view)
    )
    return jnp.zeros(shape, dtype, device=layout)
  return jnp.zeros(shape, dtype)


def _check_like_v(leaves: list[_binding.BoundLeaf], v: Any) -> None:
  """Raises, naming the path, when the updates do not fit the state."""
  have = [x.shape for x in jax.tree.leaves(v)]
  want = [(leaf.view.num_matrices, leaf.view.fan_out) for leaf in leaves]
  if have == want:
    return
  if len(have) != len(want):
    raise ValueError(
      f'scale_by_normuon was initialized for {len(have)} leaves, the updates '
      f'have {len(want)}: pass updates shaped like the params given to '
      '`init`.'
    )
  wrong = [
    f'{leaf.path!r} is {leaf.view.describe()}, the state holds {h}'
    for leaf, h, w in zip(leaves, have, want, strict=True)
    if h != w
  ]
  raise ValueError(
    f'The updates do not fit the state of scale_by_normuon: {wrong[0]} '
    '(one second moment per matrix and output neuron). Pass updates shaped '
    'like the params given to `init`, with the same `matrix_views`.'
  )


def normalize_neurons(
  o: jax.Array,
  v: jax.Array,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  r"""NorMuon's step on a `(B, fan_in, fan_out)` stack: `(update, new_v)`.

  Per matrix :math:`O` and output neuron :math:`j` (column),
  :math:`v_j \leftarrow b_2 v_j + (1 - b_2)\,\mathrm{mean}_i |O_{ij}|^2`,
  :math:`O'_{:j} = O_{:j} / \sqrt{v_j + \epsilon}`, then :math:`O'` is
  rescaled to :math:`\|O\|_F`. Computed in `v`'s dtype; a neuron with
  :math:`v_j + \epsilon = 0` (all zeros, `eps=0`) gets a zero update.
  """
  o = o.astype(jnp.result_type(o.dtype, v.dtype))
  sq = jnp.square(jnp.abs(o)).astype(v.dtype)
  v = b2 * v + (1 - b2) * jnp.mean(sq, axis=-2)
  denom = v + eps
  inv = jnp.where(denom > 0, jax.lax.rsqrt(jnp.where(denom > 0, denom, 1)), 0)
  scaled = o * inv.astype(o.dtype)[:, None, :]
  old = jnp.sqrt(jnp.sum(sq, axis=(-2, -1)))
  new = jnp.sqrt(jnp.sum(jnp.square(jnp.abs(scaled)), axis=(-2, -1)))
  ratio = jnp.where(new > 0, old / jnp.where(new > 0, new, 1), 0)
  return scaled * ratio.astype(o.dtype)[:, None, None], v


def scale_by_normuon(
  b2: jax.typing.ArrayLike = DEFAULT_B2,
  eps: jax.typing.ArrayLike = DEFAULT_EPS,
  *,
  matrix_views: _binding.MatrixViews = None,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> optax.GradientTransformation:
  r"""NorMuon: equalizes the output neurons of an orthogonalized update.

  Chain it right after `scale_by_muon` (before `scale_by_shape`). For every
  leaf, through its matrix view, each matrix :math:`O` (the Newton–Schulz
  output, `(fan_in, fan_out)`) and each output neuron :math:`j` (a column:
  a dense layer's output unit, a convolution's output channel):

  .. math::
    v_j &\leftarrow b_2 v_j + (1 - b_2)\, \tfrac{1}{\text{fan\_in}}
      \textstyle\sum_i O_{ij}^2 \\
    O'_{ij} &= O_{ij} / \sqrt{v_j + \epsilon} \\
    O'' &= O' \, \|O\|_F / \|O'\|_F

  The polar factor makes every singular value 1 but leaves the neurons'
  norms uneven; the second moment of each neuron (Adam's, shared over its
  fan-in: one number per neuron, not per entry) evens them out, and the
  rescale keeps Muon's overall size, so `scale_by_shape` and the learning
  rate mean what they mean for Muon. Stacked layers (a view's batch axes)
  have their own moments and norms.

  On several devices the means and norms are over the whole matrix, whatever
  its sharding (microsoft/dion normalizes each shard on its own). `v` is laid
  out like the parameter's batch and output axes, and updates and `v` keep
  their layouts from step to step.

  Args:
    b2: decay of the neurons' second moment, in [0, 1]; 0 normalizes by the
      current step's neuron norms alone.
    eps: added to the second moment under the square root, >= 0.
    matrix_views: as in `scale_by_muon`; pass the same.
    mesh: as in `scale_by_muon`: the mesh whose layouts updates and `v` keep
      (None: the ambient one, else the updates' types).

  Returns:
    A `GradientTransformation` whose state is a `NorMuonState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import muon_optax
    >>> params = {'conv': jnp.ones((3, 3, 8, 16))}
    >>> tx = optax.chain(
    ...   muon_optax.scale_by_muon(),
    ...   muon_optax.scale_by_normuon(b2=0.95),
    ...   muon_optax.scale_by_shape(),
    ...   optax.scale_by_learning_rate(1e-3),
    ... )
    >>> state = tx.init(params)
    >>> grads = {'conv': jax.random.normal(jax.random.key(0), (3, 3, 8, 16))}
    >>> updates, state = tx.update(grads, state)
    >>> state[1].v['conv'].shape  # one 72x16 matrix: 16 output channels
    (1, 16)

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.
  """
  _checks.check_scalar(b2, 'b2', low=0.0, high=1.0)
  _checks.check_eps(eps)
  _distributed.check_mesh(mesh)

  def init_fn(params):
    leaves = _binding.bind_views(params, matrix_views)
    flat, treedef = jax.tree.flatten(params)
    v = list(flat)
    for leaf in leaves:
      v[leaf.index] = _zeros_v(flat[leaf.index], leaf.view)
    return NorMuonState(
      count=jnp.zeros([], jnp.int32), v=jax.tree.unflatten(treedef, v)
    )

  def update_fn(updates, state, params=None):
    del params
    leaves = _binding.bind_views(updates, matrix_views)
    _check_like_v(leaves, state.v)
    flat, treedef = jax.tree.flatten(updates)
    v_flat, v_treedef = jax.tree.flatten(state.v)
    new_flat, new_v = list(flat), list(v_flat)
    for leaf in leaves:
      u = flat[leaf.index]
      o, new_v[leaf.index] = normalize_neurons(
        leaf.view.to_matrices(u), v_flat[leaf.index], b2, eps
      )
      new_flat[leaf.index] = leaf.view.from_matrices(o).astype(u.dtype)
    # Updates and moments leave as they came: XLA would otherwise pick the
    # moments' layout, and the next step would compile again for it.
    if _distributed.work_mesh(mesh, updates) is not None:
      new_flat = _distributed.restore_shardings(new_flat, flat)
      new_v = _distributed.restore_shardings(new_v, v_flat)
    return jax.tree.unflatten(treedef, new_flat), NorMuonState(
      count=optax.safe_increment(state.count),
      v=jax.tree.unflatten(v_treedef, new_v),
    )

  return optax.GradientTransformation(
    init_fn, _distributed.with_auto_axes(update_fn, mesh)
  )
