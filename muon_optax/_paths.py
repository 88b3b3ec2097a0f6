"""Parameter paths that read the same on every tree a training loop passes.

`nnx.Optimizer` hands `tx.init` a State of `nnx.Variable`s (leaf paths end in
`.value`) and `tx.update` plain arrays; `optax.partition` hides the other
group's leaves behind `optax.MaskedNode`. Routing rules and user overrides are
keyed by a path string that is identical in all of these trees, e.g.
`'blocks/0/attn/query/kernel'`.
"""

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
import fnmatch
import re
import sys
from typing import Any
from typing import TypeVar

import jax

T = TypeVar('T')


def _key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


# The array inside a parameter wrapper: an NNX Variable's value, a penzai
# NamedArray's data.
_WRAPPED = ('value', 'raw_value', 'data_array')


def path_str(keypath: Iterable[Any]) -> str:
  """Joins a JAX key path with '/', dropping the trailing `.value` of an NNX
  Variable (and `.data_array` of a penzai NamedArray)."""
  keys = list(keypath)
  if (
    keys
    and isinstance(keys[-1], jax.tree_util.GetAttrKey)
    and keys[-1].name in _WRAPPED
  ):
    keys = keys[:-1]
  return '/'.join(_key_str(k) for k in keys)


def leaves_with_paths(
  tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(kp), leaf) for kp, leaf in flat]


def is_variable(x: Any) -> bool:
  """An NNX Variable (without flax imported there can be none)."""
  nnx = sys.modules.get('flax.nnx')
  return nnx is not None and isinstance(x, nnx.Variable)


def path_tree(tree: Any) -> Any:
  """`tree` with each array leaf (each NNX Variable) replaced by its path."""
  return jax.tree_util.tree_map_with_path(
    lambda kp, _: path_str(kp), tree, is_leaf=is_variable
  )


def map_with_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """`jax.tree.map` over array leaves, with the leaf's path string first."""
  return jax.tree_util.tree_map_with_path(
    lambda kp, x: fn(path_str(kp), x), tree
  )


class PathLookup:
  """Finds the entry of a user tree (or prefix tree) for a parameter path.

  The user tree's leaves are keyed by their path; a parameter takes the entry
  with the longest path that is equal to its own or a prefix of it, so a label
  may be given for a whole subtree, as optax allows for masks.
  """

  def __init__(
    self, tree: Any, *, is_leaf: Callable[[Any], bool] | None = None
  ):
    self.entries: dict[str, Any] = dict(leaves_with_paths(tree, is_leaf))
    self.used: set[str] = set()

  def get(self, path: str, default: Any = None) -> Any:
    parts = path.split('/') if path else []
    for i in range(len(parts), -1, -1):
      key = '/'.join(parts[:i])
      if key in self.entries:
        self.used.add(key)
        return self.entries[key]
    return default

  def unused(self) -> list[str]:
    return sorted(set(self.entries) - self.used)


def match_pattern(patterns: Mapping[str, T], path: str) -> tuple[str, T] | None:
  """The first `fnmatch` pattern (in the mapping's order) matching `path`.

  A pattern matches the whole path (`'*/head/*'`) or, when it holds no '/',
  any single path component (`'head'`, `'Conv_*'`); the '.' of
  PyTorch-style keys (`'fc.weight'`) separates components too.
  """
  parts = re.split(r'[/.]', path)
  for pattern, value in patterns.items():
    if fnmatch.fnmatchcase(path, pattern):
      return pattern, value
    if '/' not in pattern and any(
      fnmatch.fnmatchcase(p, pattern) for p in parts
    ):
      return pattern, value
  return None
