"""Default routing: which parameters get Muon, and through which matrix view.

Two sources of truth, in order of reliability:

1. A Flax NNX module: the layer type says what a kernel is (a `Conv` kernel is
   `(*spatial, in, out)`, a `LinearGeneral` kernel knows its input and output
   axes, an `Embed` table is no matrix to orthogonalize), and the attribute
   name says whether a layer is the output head.
2. A plain tree (Linen params, dicts, an NNX State): the shape and the path
   names only, with Linen's default module names.

Either way, user `overrides` (fnmatch patterns on the path) come first.
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
from muon_optax import _views
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
  'logits',
  'output_layer',
)
#: Path components (fnmatch, case-insensitive) that mark an embedding table.
EMBED_NAMES: tuple[str, ...] = ('*embed*', 'wte', 'wpe')
#: timm's rule for matrices too thin for Muon (pytorch-image-models #2580).
MIN_SIDE = 4
MAX_ASPECT = 128

_ATTN_IN = ('query', 'key', 'value')
# Flax's names for per-feature parameters, which may be 2-D (a LinearGeneral
# bias is (heads, head_dim)) but are never weight matrices.
_NON_KERNEL_NAMES = ('bias', 'scale')


def _matches(component: str, names: Iterable[str]) -> bool:
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


def _shape_view(path: str, shape: tuple[int, ...]) -> MatrixView | None:
  """The view a plain-tree leaf gets from its shape and Linen-style name."""
  ndim = len(shape)
  if ndim < 2:
    return None
  if ndim == 2:
    return MatrixView.dense()
  parts = path.split('/')
  owner = parts[-2] if len(parts) >= 2 else ''
  if ndim == 3 and owner in _ATTN_IN:
    return MatrixView.general(1, 2)  # (d, heads, head_dim)
  if ndim == 3 and owner == 'out':
    return MatrixView.general(2, 1)  # (heads, head_dim, d)
  if ndim == 3 and re.fullmatch(r'DenseGeneral_\d+', owner):
    return MatrixView.general(1, 2)  # DenseGeneral's default axis=-1
  # Convolution kernels (*spatial, in, out), Linen's and most others' layout.
  return MatrixView.conv(ndim - 2)


def _plain_rules(
  params: Any,
  *,
  stacked: Sequence[str],
  head_names: Sequence[str],
  embed_names: Sequence[str],
) -> dict[str, tuple[str, MatrixView | None, str]]:
  rules = {}
  for path, leaf in _paths.leaves_with_paths(params):
    shape = tuple(np.shape(leaf))
    lead = 1 if _paths.match_pattern(dict.fromkeys(stacked), path) else 0
    view = _shape_view(path, shape[lead:])
    rules[path] = _name_rules(path, shape, view, head_names, embed_names)
  return rules


def _name_rules(path, shape, view, head_names, embed_names):
  parts = path.split('/')
  if view is None:
    return ADAM, None, 'not a matrix'
  if parts[-1] in _NON_KERNEL_NAMES:
    return ADAM, None, parts[-1]
  if any(_matches(p, embed_names) for p in parts):
    return ADAM, view, 'embedding'
  if any(_matches(p, head_names) for p in parts[:-1]):
    return ADAM, view, 'output head'
  return MUON, view, 'matrix'


def _einsum_view(einsum_str: str, ndim: int) -> MatrixView | None:
  spec = einsum_str.replace(' ', '')
  if '...' in spec or '->' not in spec:
    return None
  inputs, out = spec.split('->')
  operands = inputs.split(',')
  if len(operands) != 2 or len(operands[1]) != ndim:
    return None
  lhs, kernel = operands
  red = [i - ndim for i, c in enumerate(kernel) if c not in out]
  outs = [i - ndim for i, c in enumerate(kernel) if c in out and c not in lhs]
  if not red or not outs:
    return None
  return MatrixView(tuple(red), tuple(outs))


def _module_view(module: Any, name: str, shape: tuple[int, ...]):
  """(view, why) for a param of a known NNX layer, or None if unknown."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  known = (
    nnx.Conv,
    nnx.ConvTranspose,
    nnx.Embed,
    nnx.Linear,
    nnx.LinearGeneral,
    nnx.Einsum,
  )
  if not isinstance(module, known):
    return None
  if name != 'kernel' and not isinstance(module, nnx.Embed):
    return None, ADAM, name
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    num_spatial = len(module.kernel_size)
    if isinstance(module, nnx.ConvTranspose) and module.transpose_kernel:
      view = MatrixView(tuple(range(-num_spatial - 2, -2)) + (-1,), (-2,))
    else:
      view = MatrixView.conv(num_spatial)
    groups = getattr(module, 'feature_group_count', 1) or 1
    if groups > 1 and module.in_features // groups == 1:
      return view, ADAM, 'depthwise conv'
    return view, MUON, 'conv'
  if isinstance(module, nnx.Embed):
    return None, ADAM, 'embedding'
  if isinstance(module, nnx.LinearGeneral):
    view = MatrixView.general(len(module.in_features), len(module.out_features))
    return view, MUON, 'linear'
  if isinstance(module, nnx.Linear):
    return MatrixView.dense(), MUON, 'linear'
  if isinstance(module, nnx.Einsum):
    view = _einsum_view(module.einsum_str, len(module.kernel_shape))
    return (view, MUON, 'einsum') if view else None
  return None


def _module_rules(
  module: Any,
  *,
  head_names: Sequence[str],
  embed_names: Sequence[str],
) -> dict[str, tuple[str, MatrixView | None, str]]:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  state = nnx.state(module, nnx.Param)
  rules = _plain_rules(
    state, stacked=(), head_names=head_names, embed_names=embed_names
  )
  for mpath, sub in nnx.iter_graph(module):
    if not isinstance(sub, nnx.Module):
      continue
    prefix = '/'.join(str(p) for p in mpath)
    is_head = bool(mpath) and _matches(str(mpath[-1]), head_names)
    for name, var in vars(sub).items():
      if not isinstance(var, nnx.Param):
        continue
      path = f'{prefix}/{name}' if prefix else name
      if path not in rules:
        continue
      shape = tuple(np.shape(var.get_value()))
      found = _module_view(sub, name, shape)
      if found is None:
        continue  # keep the plain-tree rule
      view, label, why = found
      if view is not None:
        try:
          view.resolve(shape)
        except ValueError:
          continue
      if label == MUON and is_head:
        label, why = ADAM, 'output head'
      rules[path] = (label, view, f'{why} ({type(sub).__name__})')
  return rules


def _is_module(x: Any) -> bool:
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, nnx.Module)


def _params_tree(params_or_module: Any) -> Any:
  if _is_module(params_or_module):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    return nnx.state(params_or_module, nnx.Param)
  return params_or_module


def route(
  params_or_module: Any,
  *,
  overrides: Mapping[str, str] | None = None,
  view_overrides: Mapping[str, MatrixView] | None = None,
  stacked: Sequence[str] = (),
  head_names: Sequence[str] = HEAD_NAMES,
  embed_names: Sequence[str] = EMBED_NAMES,
  min_side: int = MIN_SIDE,
  max_aspect: float = MAX_ASPECT,
) -> dict[str, tuple[str, MatrixView | None, str]]:
  """{path: (label, view, reason)} for every array leaf; see `param_labels`."""
  if isinstance(stacked, str):
    stacked = (stacked,)
  for pattern, label in (overrides or {}).items():
    if label not in LABELS:
      raise ValueError(
        f'`overrides[{pattern!r}]` is {label!r}; the labels are {list(LABELS)}.'
      )
  view_overrides = {
    pattern: view
    if view is None
    else _views.as_matrix_view(view, f'`overrides[{pattern!r}]`')
    for pattern, view in (view_overrides or {}).items()
  }
  # min_side 0 would divide by a zero side; max_aspect < 1 sends every
  # matrix to Adam.
  if not min_side >= 1:
    raise ValueError(f'`min_side` must be at least 1, got {min_side=}.')
  if not max_aspect >= 1:
    raise ValueError(f'`max_aspect` must be at least 1, got {max_aspect=}.')
  if _is_module(params_or_module):
    if stacked:
      raise ValueError(
        '`stacked` is for plain trees; an NNX module shows stacked layers by '
        'their shapes (the leading axes a layer does not own are a batch).'
      )
    rules = _module_rules(
      params_or_module, head_names=head_names, embed_names=embed_names
    )
  else:
    rules = _plain_rules(
      params_or_module,
      stacked=stacked,
      head_names=head_names,
      embed_names=embed_names,
    )
  tree = _params_tree(params_or_module)
  shapes = {p: tuple(np.shape(x)) for p, x in _paths.leaves_with_paths(tree)}
  for path, (label, view, why) in rules.items():
    hit = _paths.match_pattern(view_overrides or {}, path)
    if hit is not None:
      view, why = hit[1], f'view override {hit[0]!r}'
    if label == MUON and view is not None:
      try:
        resolved = view.resolve(shapes[path])
      except ValueError as e:
        raise ValueError(f'Parameter {path!r}: {e}') from None
      if is_degenerate(
        resolved.matrix_shape, min_side=min_side, max_aspect=max_aspect
      ):
        label, why = ADAM, f'degenerate {resolved.describe()}'
    hit = _paths.match_pattern(overrides or {}, path)
    if hit is not None:
      label, why = hit[1], f'override {hit[0]!r}'
    rules[path] = (label, view, why)
  return rules


def _tree_like(params_or_module: Any, values: Mapping[str, Any]) -> Any:
  tree = _params_tree(params_or_module)
  is_var = None
  if _is_module(params_or_module):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree_util.tree_map_with_path(
    lambda kp, _: values[_paths.path_str(kp)], tree, is_leaf=is_var
  )


def param_labels(
  params_or_module: Any,
  *,
  overrides: Mapping[str, str] | None = None,
  stacked: Sequence[str] = (),
  head_names: Sequence[str] = HEAD_NAMES,
  embed_names: Sequence[str] = EMBED_NAMES,
  min_side: int = MIN_SIDE,
  max_aspect: float = MAX_ASPECT,
) -> Any:
  """The default Muon/Adam labels: a tree of `'muon'` and `'adam'`.

  Rules, first match wins:

  1. `overrides`: `{pattern: label}`; a pattern is an fnmatch pattern on the
     '/'-joined path (`'blocks/*/mlp/*'`) or, without '/', on any one path
     component (`'stem'`, `'Conv_0'`).
  2. Leaves with fewer than two axes (biases, norm scales, scalars): Adam.
  3. Embedding tables (an `nnx.Embed`, or a path component matching
     `embed_names`, e.g. Linen's `Embed_0`, `embedding`, `wte`): Adam.
  4. The output head: a layer whose name matches `head_names` (`head`,
     `lm_head`, `*_head`, `classifier`, `logits`, `output_layer`): Adam. The
     head is found by name only; a head called otherwise (say Linen's last
     `Dense_3`) needs an override such as `{'Dense_3': 'adam'}`.
  5. Depthwise convolutions and grouped ones with one input channel per
     group (NNX modules), and degenerate matrices (a side under `min_side`
     or an aspect ratio over `max_aspect`, timm's rule): Adam.
  6. Every other kernel, through its matrix view: Muon. That includes every
     convolution kernel, viewed as a `(prod(spatial) * in, out)` matrix.

  Given an NNX module the layer types decide (rules 3, 5 and the views);
  given a plain tree (Linen params, dicts, an NNX State) the shapes and names
  do. The returned tree has the structure of the params (for a module, of
  `nnx.state(module, nnx.Param)`); `muon` matches it to whatever tree it is
  handed by path, so it works for the Variables `nnx.Optimizer` passes to
  `init` and the arrays it passes to `update` alike.

  Args:
    params_or_module: a params pytree, or a Flax NNX module.
    overrides: `{pattern: 'muon' | 'adam'}`, applied last so they always win.
    stacked: plain trees only: patterns of subtrees whose leaves carry a
      leading layer axis (Linen `nn.scan`), which becomes a batch axis.
    head_names: fnmatch patterns (case-insensitive) naming output heads.
    embed_names: fnmatch patterns (case-insensitive) naming embeddings.
    min_side: matrices with a side shorter than this go to Adam.
    max_aspect: matrices with a longer-to-shorter side ratio above this go to
      Adam.

  Returns:
    A pytree of labels with the params' structure.

  Examples:
    >>> import jax.numpy as jnp
    >>> import muon_optax
    >>> params = {'Conv_0': {'kernel': jnp.zeros((3, 3, 16, 32)),
    ...                      'bias': jnp.zeros(32)},
    ...           'head': {'kernel': jnp.zeros((32, 10))}}
    >>> muon_optax.param_labels(params)
    {'Conv_0': {'bias': 'adam', 'kernel': 'muon'}, 'head': {'kernel': 'adam'}}
  """
  rules = route(
    params_or_module,
    overrides=overrides,
    stacked=stacked,
    head_names=head_names,
    embed_names=embed_names,
    min_side=min_side,
    max_aspect=max_aspect,
  )
  return _tree_like(params_or_module, {p: r[0] for p, r in rules.items()})


def matrix_views(
  params_or_module: Any,
  *,
  overrides: Mapping[str, MatrixView] | None = None,
  stacked: Sequence[str] = (),
) -> Any:
  """The default matrix view of every leaf: a tree of `MatrixView` or None.

  - 2-D kernels: `(fan_in, fan_out)`.
  - Convolution kernels `(*spatial, in, out)`: one `(prod(spatial) * in, out)`
    matrix.
  - Attention projections (NNX `LinearGeneral`, Linen `query`/`key`/`value`
    and `out`): `(d, heads, head_dim)` is `(d, heads * head_dim)`, and
    `(heads, head_dim, d)` is `(heads * head_dim, d)`.
  - Stacked layers: an NNX layer's leading axes beyond its own kernel rank are
    a batch; for plain trees declare them with `stacked` (`nn.scan` params
    look like conv kernels otherwise).
  - `overrides`: `{pattern: MatrixView}` with the patterns of `param_labels`.

  Leaves with fewer than two axes get None.
  """
  rules = route(params_or_module, view_overrides=overrides, stacked=stacked)
  return _tree_like(params_or_module, {p: r[1] for p, r in rules.items()})
