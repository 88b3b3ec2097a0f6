"""The shape-and-name rules: a label and a matrix view from a leaf's path.

These are the fallback when nothing better is known (no model object, no
traced computation): Flax's layouts by default, PyTorch/Equinox layouts for
leaves named `weight`, Linen's default layer names.
"""

from collections.abc import Iterable
from collections.abc import Sequence
import fnmatch
import re
from typing import Any
from typing import NamedTuple

import numpy as np

from muon_optax import _paths
from muon_optax._views import MatrixView

MUON = 'muon'
ADAM = 'adam'
LABELS = (MUON, ADAM)

#: Path components (fnmatch, case-insensitive) that mark the output head.
HEAD_NAMES: tuple[str, ...] = (
  'head',
  'lm_head',
  '*_head',
  'classifier',
  'logit*',
  'output_layer',
  'output_projection',
  'fc',  # torchvision's ResNet head; its MLPs say fc1, fc2, c_fc
)
#: Path components (fnmatch, case-insensitive) that mark an embedding table.
EMBED_NAMES: tuple[str, ...] = ('*embed*', '*_emb', 'emb', 'wte', 'wpe')
#: timm's rule for matrices too thin for Muon (pytorch-image-models #2580).
MIN_SIDE = 4
MAX_ASPECT = 128

_ATTN_IN = ('query', 'key', 'value')
# Flax's names for per-feature parameters, which may be 2-D (a LinearGeneral
# bias is (heads, head_dim)) but are never weight matrices.
_NON_KERNEL_NAMES = ('bias', 'scale')
# PyTorch's and Equinox's name for a kernel stored (out, in, *spatial).
_OUT_IN_NAMES = ('weight',)


class Rule(NamedTuple):
  """One leaf's routing: its label, matrix view and the reason for both."""

  label: str
  view: MatrixView | None
  why: str


def components(path: str) -> list[str]:
  """A path's names: split on '/' and on the '.' of PyTorch-style keys
  (`'lm_head.weight'` is the layer `lm_head` and the leaf `weight`)."""
  return re.split(r'[/.]', path)


def matches(component: str, names: Iterable[str]) -> bool:
  c = component.lower()
  return any(fnmatch.fnmatchcase(c, n.lower()) for n in names)


def is_degenerate(
  matrix_shape: tuple[int, int],
  *,
  min_side: int = MIN_SIDE,
  max_aspect: float = MAX_ASPECT,
) -> bool:
  """A matrix so thin that its polar factor is no useful update direction."""
  m, n = matrix_shape
  lo, hi = min(m, n), max(m, n)
  return lo < min_side or hi / lo > max_aspect


def out_in_view(ndim: int) -> MatrixView:
  """`(out, in, *spatial)` (PyTorch, Equinox) as `(in·prod(spatial), out)`."""
  return MatrixView(tuple(range(1 - ndim, 0)), (-ndim,))


def shape_view(path: str, shape: tuple[int, ...]) -> tuple[MatrixView, str]:
  """The view a plain-tree leaf gets from its shape and name, and why.

  The reason says when the layout was a guess (a 3+-axis leaf that no name
  identifies).
  """
  ndim = len(shape)
  parts = components(path)
  name = parts[-1]
  owner = parts[-2] if len(parts) >= 2 else ''
  if name in _OUT_IN_NAMES:
    return out_in_view(ndim), 'weight (out, in, ...)'
  if ndim == 2:
    return MatrixView.dense(), 'matrix'
  if ndim == 3 and owner in _ATTN_IN:
    return MatrixView.general(1, 2), 'attention (d, heads, head_dim)'
  if ndim == 3 and owner == 'out':
    return MatrixView.general(2, 1), 'attention (heads, head_dim, d)'
  if ndim == 3 and re.fullmatch(r'DenseGeneral_\d+', owner):
    return MatrixView.general(1, 2), 'DenseGeneral'
  if re.fullmatch(r'Conv(Transpose)?_\d+', owner) or 'conv' in owner.lower():
    return MatrixView.conv(ndim - 2), 'conv (*spatial, in, out)'
  # No name says what this is: Flax's conv layout is the likeliest.
  return MatrixView.conv(ndim - 2), 'guessed conv layout (*spatial, in, out)'


def name_rule(
  path: str,
  shape: tuple[int, ...],
  *,
  stacked: bool,
  head_names: Sequence[str],
  embed_names: Sequence[str],
) -> Rule:
  """The rule for one plain-tree leaf (before degenerate checks)."""
  parts = components(path)
  own = shape[1:] if stacked else shape
  if len(own) < 2:
    return Rule(ADAM, None, 'not a matrix')
  if parts[-1] in _NON_KERNEL_NAMES:
    return Rule(ADAM, None, parts[-1])
  view, why = shape_view(path, own)
  if any(matches(p, embed_names) for p in parts):
    return Rule(ADAM, view, 'embedding')
  if any(matches(p, head_names) for p in parts[:-1]):
    return Rule(ADAM, view, 'output head')
  out_in = parts[-1] in _OUT_IN_NAMES
  if len(own) >= 3 and (out_in or 'conv' in why):
    # One input channel per kernel: a depthwise conv, or a 1-channel stem,
    # which the shapes cannot tell apart; Muon wants neither.
    if (own[1] if out_in else own[-2]) == 1:
      return Rule(ADAM, view, 'one input channel (depthwise conv or stem)')
  return Rule(MUON, view, why)


def plain_rules(
  params: Any,
  *,
  stacked: Sequence[str],
  head_names: Sequence[str],
  embed_names: Sequence[str],
) -> dict[str, Rule]:
  rules = {}
  patterns = dict.fromkeys(stacked)
  for path, leaf in _paths.leaves_with_paths(params):
    shape = tuple(np.shape(leaf))
    is_stacked = _paths.match_pattern(patterns, path) is not None
    rule = name_rule(
      path,
      shape,
      stacked=is_stacked,
      head_names=head_names,
      embed_names=embed_names,
    )
    rules[path] = rule
  return rules
