"""The names-and-shapes source: what a plain tree's leaf is, from its path.

The source for trees that carry nothing else (Linen params, dicts, an NNX
State, Haiku params, PyTorch-style state dicts): Flax's layouts by default,
PyTorch's `(out, in, *spatial)` for leaves named `weight`, Linen's and
Haiku's layer names. A 3+-axis leaf whose name says nothing is read in the
conv layout and marked `guessed`, which `finish` warns about.
"""

from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
import fnmatch
import re
from typing import Any

import jax
import numpy as np

from muon_optax import _paths
from muon_optax import _routing
from muon_optax._routing import HEAD
from muon_optax._routing import MATRIX
from muon_optax._routing import OTHER
from muon_optax._routing import Decision
from muon_optax._views import MatrixView

_ATTN_IN = ('query', 'key', 'value')
# Names of per-feature parameters, which may be 2-D (a LinearGeneral bias is
# (heads, head_dim), a stacked one (layers, features)) but are never weight
# matrices: Flax's, and Haiku's `offset`. (Haiku's bias `b` is one only
# beside a `w`: LoRA's `a` and `b` are matrices.)
_NON_KERNEL_NAMES = ('bias', 'scale', 'offset')
# PyTorch's and Equinox's name for a kernel stored (out, in, *spatial).
_OUT_IN_NAMES = ('weight',)
# Flax's and Haiku's names for a kernel stored (*in, *out).
_KERNEL_NAMES = ('kernel', 'w')


def components(path: str) -> list[str]:
  """A path's names: split on '/' and on the '.' of PyTorch-style keys
  (`'lm_head.weight'` is the layer `lm_head` and the leaf `weight`)."""
  return re.split(r'[/.]', path)


def matches(component: str, names: Iterable[str]) -> bool:
  c = component.lower()
  return any(fnmatch.fnmatchcase(c, n.lower()) for n in names)


def out_in_view(ndim: int) -> MatrixView:
  """`(out, in, *spatial)` (PyTorch, Equinox) as `(in·prod(spatial), out)`."""
  return MatrixView(tuple(range(1 - ndim, 0)), (-ndim,))


def _is_conv_name(owner: str) -> bool:
  return bool(re.fullmatch(r'Conv(Transpose)?_\d+', owner)) or (
    'conv' in owner.lower()
  )


def shape_view(
  path: str, shape: tuple[int, ...]
) -> tuple[MatrixView, str, bool]:
  """The view a plain-tree leaf gets from its shape and name, why, and
  whether that layout is a guess (a 3+-axis leaf no name identifies)."""
  ndim = len(shape)
  parts = components(path)
  name = parts[-1]
  owner = parts[-2] if len(parts) >= 2 else ''
  if name in _OUT_IN_NAMES:
    return out_in_view(ndim), 'weight (out, in, ...)', False
  if ndim == 2:
    why = 'matrix' if name in _KERNEL_NAMES else 'matrix, (in, out) by default'
    return MatrixView.dense(), why, False
  # Flax's attention projections. A fourth axis is a guess: stacked layers
  # (Linen `nn.scan`) or grouped heads (penzai's (d, kv, q_rep, head_dim)).
  if owner in _ATTN_IN:
    why = 'attention (d, heads, head_dim)'
    return MatrixView.general(1, 2), why, ndim > 3
  if owner == 'out':
    why = 'attention (heads, head_dim, d)'
    return MatrixView.general(2, 1), why, ndim > 3
  if ndim == 3 and re.fullmatch(r'DenseGeneral_\d+', owner):
    return MatrixView.general(1, 2), 'DenseGeneral', False
  if _is_conv_name(owner) or _is_conv_name(name):
    return MatrixView.conv(ndim - 2), 'conv (*spatial, in, out)', False
  if ndim == 4 and name in _KERNEL_NAMES:
    # The convention: a 4-axis Flax or Haiku kernel is a 2-D conv's.
    return MatrixView.conv(2), 'conv (kh, kw, in, out) by default', False
  # No name says what this is (a Conv1D, a scanned Dense, an einsum kernel):
  # Flax's conv layout is the likeliest, and a guess.
  why = 'guessed conv layout (*spatial, in, out)'
  return MatrixView.conv(ndim - 2), why, True


def _is_haiku_bias(path: str, shape, shapes) -> bool:
  """A leaf `b` beside a `w` whose output axis it matches (Haiku's)."""
  parent, _, name = path.rpartition('/')
  w = (shapes or {}).get(f'{parent}/w' if parent else 'w')
  return name == 'b' and w is not None and shape[-1:] == tuple(w.shape)[-1:]


def decide(
  path: str,
  shape: tuple[int, ...],
  *,
  stacked: bool,
  head_names: Sequence[str],
  embed_names: Sequence[str],
  shapes: Mapping[str, Any] | None = None,
) -> Decision:
  """What one plain-tree leaf is, from its path and shape (and, for Haiku's
  `b`, its sibling's in `shapes`)."""
  parts = components(path)
  own = shape[1:] if stacked else shape
  if len(own) < 2:
    return Decision(OTHER, None, 'not a matrix')
  if parts[-1] in _NON_KERNEL_NAMES or _is_haiku_bias(path, shape, shapes):
    return Decision(OTHER, None, parts[-1])
  view, why, guessed = shape_view(path, own)
  out_in = parts[-1] in _OUT_IN_NAMES
  conv = len(own) >= 3 and (out_in or 'conv' in why)
  if any(matches(p, embed_names) for p in parts):
    return Decision(OTHER, view, 'embedding (by name)')
  named = [p for p in parts[:-1] if matches(p, head_names)]
  if named:
    return Decision(HEAD, view, f'named {named[-1]!r}; {why}', guessed, conv)
  # One input channel per kernel: a depthwise conv, or a 1-channel stem,
  # which the shapes cannot tell apart; Muon wants neither.
  if conv and (own[1] if out_in else own[-2]) == 1:
    return Decision(OTHER, view, 'one input channel (depthwise conv or stem)')
  return Decision(MATRIX, view, why, guessed, conv)


def attention_layers(paths: Iterable[str]) -> dict[str, tuple[str, str]]:
  """Flax `MultiHeadAttention` layers by name: each `<layer>/query/kernel`
  with a `<layer>/key/kernel`."""
  paths = set(paths)
  found = {}
  for path in sorted(paths):
    if path == 'query/kernel' or path.endswith('/query/kernel'):
      layer = path[: -len('query/kernel')].rstrip('/')
      key = f'{layer}/key/kernel' if layer else 'key/kernel'
      if key in paths:
        found[layer] = (path, key)
  return found


def struct(x: Any) -> jax.ShapeDtypeStruct:
  """A leaf's shape and dtype."""
  dtype = getattr(x, 'dtype', None)
  if dtype is None:
    dtype = np.asarray(x).dtype
  return jax.ShapeDtypeStruct(tuple(np.shape(x)), dtype)


def source(
  params: Any,
  *,
  stacked: Sequence[str] = (),
  head_names: Sequence[str] = _routing.HEAD_NAMES,
  embed_names: Sequence[str] = _routing.EMBED_NAMES,
) -> _routing.Source:
  """The names-and-shapes decisions for every array leaf of `params`."""
  patterns = dict.fromkeys(stacked)
  paths = _paths.path_tree(params)
  shapes = {p: struct(x) for p, x in _paths.leaves_with_paths(params)}
  decisions = {
    path: decide(
      path,
      s.shape,
      stacked=_paths.match_pattern(patterns, path) is not None,
      head_names=head_names,
      embed_names=embed_names,
      shapes=shapes,
    )
    for path, s in shapes.items()
  }
  unmatched = [
    pattern
    for pattern in patterns
    if not any(_paths.match_pattern({pattern: None}, p) for p in shapes)
  ]
  if unmatched:
    raise ValueError(
      f'The `stacked` patterns {unmatched} match no parameter; the paths are '
      f'{sorted(shapes)[:20]}{" ..." if len(shapes) > 20 else ""}.'
    )
  return _routing.Source(
    'names', paths, shapes, decisions, attention_layers(decisions)
  )
