"""Groups of same-shape matrices, and how a stack of them runs.

Matrices with the same short side, long side and dtype form a group; a tall
`(L, k)` matrix and a wide `(k, L)` one share it (the tall one is transposed
when a group is stacked). Where a group runs is the caller's: one device or
a mesh (`muon_optax._distributed`). How a stack runs on one device is the
one execution policy of the package (`strategy`, `run_stack`), used by
`orthogonalize` and the transformations alike.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RunGroup = Callable[[list[jax.Array]], list[jax.Array]]

STRATEGIES = ('auto', 'stack', 'unroll', 'map')
# On CPU a stack of at most this many matrices runs as one plain call per
# matrix; a longer one as `lax.map`, which compiles one body for any length.
MAX_UNROLL = 32


def strategy(group_strategy: str, count: int, backend: str | None = None):
  """How a stack of `count` matrices runs: `group_strategy`, or for `'auto'`
  the backend's best.

  Accelerators gain from one batched call (fewer, larger kernels;
  modded-nanogpt and microsoft/dion batch by shape): `'stack'`. On CPU one
  batched Newton–Schulz is slower than plain per-matrix dots, and plain calls
  let XLA run independent matrices on different cores: `'unroll'`, up to
  `MAX_UNROLL` matrices, then `'map'` (benchmarks/README.md).
  """
  if group_strategy != 'auto':
    return group_strategy
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    return 'stack'
  return 'unroll' if count <= MAX_UNROLL else 'map'


def run_stack(
  ns: Callable[[jax.Array], jax.Array], x: jax.Array, group_strategy: str
) -> jax.Array:
  """`ns` over a `(B, m, n)` stack, per `strategy(group_strategy, B)`."""
  how = strategy(group_strategy, x.shape[0])
  if x.shape[0] == 1:  # a lone matrix: plain dots, no batch, no loop
    return ns(x[0])[None]
  if how == 'stack':
    return ns(x)
  if how == 'map':
    return jax.lax.map(ns, x)
  return jnp.stack([ns(x[i]) for i in range(x.shape[0])])


def group_key(x: jax.Array) -> tuple[int, int, Any]:
  """`(short side, long side, dtype)` of a `(B, m, n)` stack."""
  m, n = x.shape[-2:]
  return min(m, n), max(m, n), x.dtype


def stack_wide(mats: Sequence[jax.Array]) -> jax.Array:
  """`(B_i, m, n)` arrays of one group as one wide `(sum B_i, k, L)` stack."""
  wide = [
    x if x.shape[-2] <= x.shape[-1] else jnp.swapaxes(x, -1, -2) for x in mats
  ]
  return jnp.concatenate(wide, axis=0) if len(wide) > 1 else wide[0]


def split_wide(stack: jax.Array, mats: Sequence[jax.Array]) -> list[jax.Array]:
  """The inverse of `stack_wide`: one array per input, in its orientation."""
  offsets = np.cumsum([0] + [x.shape[0] for x in mats])
  out = []
  for x, lo, hi in zip(mats, offsets[:-1], offsets[1:], strict=True):
    y = stack[lo:hi]
    out.append(y if x.shape[-2] <= x.shape[-1] else jnp.swapaxes(y, -1, -2))
  return out


def orthogonalize_groups(
  mats: Sequence[jax.Array], run_group: RunGroup
) -> list[jax.Array]:
  """Runs `run_group` once per group of `(B, m, n)` arrays; keeps the order."""
  groups: dict[tuple, list[int]] = {}
  for i, x in enumerate(mats):
    groups.setdefault(group_key(x), []).append(i)
  out: list[Any] = [None] * len(mats)
  for members in groups.values():
    results = run_group([mats[i] for i in members])
    for i, y in zip(members, results, strict=True):
      out[i] = y
  return out
