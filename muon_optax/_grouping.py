"""Groups of same-shape matrices, so that each group runs as one piece of work.

Matrices with the same short side, long side and dtype form a group; a tall
`(L, k)` matrix and a wide `(k, L)` one share it (the tall one is transposed
when a group is stacked). How a group runs is the caller's: one device or a
mesh (`muon_optax._distributed`), one batched call or one call per matrix.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RunGroup = Callable[[list[jax.Array]], list[jax.Array]]


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
