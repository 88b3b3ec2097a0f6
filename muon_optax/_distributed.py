"""Newton–Schulz split across the devices of a mesh, with JAX SPMD.

With a mesh of D devices, every device orthogonalizes a share of the
matrices instead of all of them (modded-nanogpt's banks, dion's megabatches,
MaxText's layer-axis all-to-all):

- Matrices of one (short side, long side, dtype) form a group, a stack
  `(G, k, L)` (tall matrices are transposed, so a `(k, L)` and an `(L, k)`
  kernel share a group). The stack is sharded along G over every mesh axis
  (padded with zero matrices to a multiple of D) and each device runs a plain
  batched Newton–Schulz on its slice in a `shard_map`: no communication
  inside the iteration.
- When G is not a multiple of D, the left-over `G mod D` large matrices are
  sharded inside the matmuls instead: the long side is split over the
  devices, the Gram matrix is all-reduced and its rows split, so that each
  device does 1/D of every product (two k×k collectives per step).
- The per-leaf results are given back their gradient's sharding, so updates
  and state keep the parameters' layout (FSDP, tensor-parallel, stacked
  layers, replicated). XLA inserts the all-to-alls / all-gathers that move
  a matrix between its parameter layout and its Newton–Schulz layout.

Without a multi-device mesh nothing here runs (`resolve_mesh` gives None) and
`scale_by_muon` keeps its single-device path. The sharding flags only
describe where work happens: the arithmetic is the single-device one, so the
results agree to float rounding.
"""

from collections.abc import Callable
from collections.abc import Sequence
import math
from typing import Any

import jax
from jax import lax
from jax.experimental.shard_alike import shard_alike
import jax.numpy as jnp
import numpy as np

from muon_optax import _coeffs
from muon_optax import _grouping
from muon_optax import _newton_schulz

Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh
P = jax.sharding.PartitionSpec

# A left-over matrix is sharded inside the matmuls when its short side is at
# least this many rows per device and it has at least this many entries;
# smaller ones are cheaper padded into the batch than paying two collectives
# per Newton–Schulz step.
MIN_ROWS_PER_DEVICE = 8
MIN_SHARDED_ENTRIES = 256 * 256


def _work_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the work can be split over (not manual ones)."""
  types = getattr(mesh, 'axis_types', None) or ()
  manual = jax.sharding.AxisType.Manual
  return tuple(
    name
    for i, name in enumerate(mesh.axis_names)
    if i >= len(types) or types[i] != manual
  )


def resolve_mesh(mesh: Mesh | None) -> Mesh | None:
  """`mesh`, else the ambient one; None when there is nothing to split over.

  The ambient mesh is the one set by `jax.set_mesh` (or
  `jax.sharding.use_abstract_mesh`). Manual axes (inside a user's
  `shard_map`) are already split by the user and are left alone.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  axes = _work_axes(mesh)
  if math.prod(mesh.shape[a] for a in axes) <= 1:
    return None
  return mesh


def check_mesh(mesh: Any) -> None:
  if mesh is not None and not isinstance(
    mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)
  ):
    raise TypeError(
      '`mesh` must be a jax.sharding.Mesh, a jax.sharding.AbstractMesh or '
      f'None (the ambient mesh of `jax.set_mesh`), got {mesh!r}.'
    )


class ShardedProducts(_newton_schulz.LocalProducts):
  """Products of a wide `(r, k, L/D)` shard whose long side is split.

  Runs inside `shard_map`. `A = X Xᴴ` is a sum of per-device partial
  products (an all-reduce); each device squares its `k/D` rows of `A`, and
  the polynomial's rows are all-gathered for the last product. Each device
  does 1/D of every product, for two `k x k` collectives per step.
  """

  def __init__(self, shape, dtype, compute_dtype, *, axes, num_devices):
    super().__init__(shape, dtype, compute_dtype)
    self.tall = False  # stacks are wide; a shard's long side may be short
    self.k = shape[-2]
    self.axes = axes
    self.rows = self.k // num_devices

  def sq_norm(self, x):
    return lax.psum(super().sq_norm(x), self.axes)

  def gram(self, x):
    return lax.psum(super().gram(x), self.axes)

  def poly(self, gram, a, b, c):
    start = lax.axis_index(self.axes) * self.rows
    eye_rows = (
      lax.broadcasted_iota(jnp.int32, (self.rows, self.k), 0) + start
      == lax.broadcasted_iota(jnp.int32, (self.rows, self.k), 1)
    ).astype(gram.dtype)
    gram_rows = lax.dynamic_slice_in_dim(gram, start, self.rows, axis=1)
    poly_rows = b * gram_rows + c * self.matmul(gram_rows, gram) + a * eye_rows
    return lax.all_gather(poly_rows, self.axes, axis=1, tiled=True)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def mesh_group_runner(
  mesh: Mesh,
  *,
  plan: _coeffs.NewtonSchulzPlan,
  preconditioning: str,
  eps: jax.typing.ArrayLike,
  compute_dtype: np.dtype | None,
  local_ns: Callable[[jax.Array], jax.Array],
) -> _grouping.RunGroup:
  """How one group runs on `mesh`: its stack split over the devices.

  `local_ns` orthogonalizes a device's `(b, k, L)` slice. The ambient mesh,
  when there is one, wins over `mesh` (inside `auto_axes` it is the same
  mesh with its axes made auto).
  """
  current = jax.sharding.get_abstract_mesh()
  mesh = mesh if current.empty else current
  axes = _work_axes(mesh)
  num_devices = math.prod(mesh.shape[a] for a in axes)

  def sharded_ns(x):
    products = ShardedProducts(
      x.shape, x.dtype, compute_dtype, axes=axes, num_devices=num_devices
    )
    out = _newton_schulz.iterate(
      x, products, plan=plan, preconditioning=preconditioning, eps=eps
    )
    return out.astype(x.dtype)

  def run(mats):
    stack = _grouping.stack_wide(mats)
    total, k, big = stack.shape
    whole, left = divmod(total, num_devices)
    split_matmuls = (
      left > 0
      and k >= MIN_ROWS_PER_DEVICE * num_devices
      and k * big >= MIN_SHARDED_ENTRIES
    )
    parts = []
    batched = whole * num_devices if split_matmuls else total
    if batched:
      spec = P(axes, None, None)
      part = _pad_to(stack[:batched], 0, num_devices)
      part = jax.shard_map(
        local_ns, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False
      )(part)
      parts.append(part[:batched])
    if split_matmuls:
      spec = P(None, None, axes)
      part = _pad_to(_pad_to(stack[batched:], 1, num_devices), 2, num_devices)
      part = jax.shard_map(
        sharded_ns, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False
      )(part)
      parts.append(part[:, :k, :big])
    result = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    return _grouping.split_wide(result, mats)

  return run


def restore_shardings(
  ys: Sequence[jax.Array], refs: Sequence[jax.Array]
) -> list[jax.Array]:
  """Ties each result to its gradient's sharding (auto mesh axes).

  Under auto axes nothing else says which layout an update should leave jit
  in: XLA would follow the Newton–Schulz layout (batch-sharded stacks) and
  the updates would stop matching the parameters.
  """
  return [shard_alike(r, y)[1] for r, y in zip(refs, ys, strict=True)]


def work_mesh(mesh: Mesh | None, tree: Any) -> Mesh | None:
  """The mesh to split work over, read the same way by every transformation:
  `mesh`, else the ambient one, else the mesh in `tree`'s types.

  Under explicit mesh axes (`jax.make_mesh`'s default) every array, traced
  or not, carries its sharding in its type; under auto axes a traced one
  does not, and only `mesh` or the ambient mesh can say. Nothing is
  remembered between calls.
  """
  if mesh is None and jax.sharding.get_abstract_mesh().empty:
    for x in jax.tree.leaves(tree):
      sharding = getattr(jax.typeof(x), 'sharding', None)
      found = getattr(sharding, 'mesh', None)
      if found is not None and not found.empty:
        mesh = found
        break
  return resolve_mesh(mesh)


def with_auto_axes(update_fn: Callable, mesh: Mesh | None) -> Callable:
  """Runs `update_fn(updates, state, params)` with the mesh axes auto.

  Under explicit mesh axes (`jax.make_mesh`'s default) every array carries
  its sharding in its type, and the reshapes and concatenations that build
  the Newton–Schulz stacks would need a sharding rule for every layout. The
  update runs instead inside `jax.sharding.auto_axes`, and its outputs get
  the types of its inputs back: updates the gradients', the state its own.
  """

  def wrapped(updates, state, params=None):
    resolved = work_mesh(mesh, updates)
    if resolved is None:
      return update_fn(updates, state, params)
    current = jax.sharding.get_abstract_mesh()
    if current.empty:
      # An explicit `mesh=` without an ambient one: make it ambient, so that
      # `auto_axes` and `shard_map` see it.
      abstract = getattr(resolved, 'abstract_mesh', resolved)
      with jax.sharding.use_abstract_mesh(abstract):
        return wrapped(updates, state, params)
    explicit = tuple(
      name
      for name, t in zip(current.axis_names, current.axis_types, strict=True)
      if t == jax.sharding.AxisType.Explicit
    )
    if not explicit:
      return update_fn(updates, state, params)
    specs = jax.tree.map(
      lambda x: jax.typeof(x).sharding.spec, (updates, state)
    )
    return jax.sharding.auto_axes(
      lambda u, s, p: update_fn(u, s, p), axes=explicit, out_sharding=specs
    )(updates, state, params)

  return wrapped
