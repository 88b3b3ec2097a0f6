"""Routing: which parameters get Muon, and through which matrix view.

Sources of truth, in order of reliability:

1. The model's computation (`muon_optax.trace_routing`): a `Routing`.
2. A model object: a Flax NNX module's layer types say what a kernel is.
3. A plain tree (Linen params, dicts, an NNX State, PyTorch-style state
   dicts): the shape and the path names only (`muon_optax._rules`).

User `overrides` (fnmatch patterns on the path) come first. This module
decides; it never computes an update.
"""

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import importlib
import math
import sys
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from muon_optax import _paths
from muon_optax import _rules
from muon_optax import _views
from muon_optax._rules import ADAM
from muon_optax._rules import EMBED_NAMES
from muon_optax._rules import HEAD_NAMES
from muon_optax._rules import LABELS
from muon_optax._rules import MAX_ASPECT
from muon_optax._rules import MIN_SIDE
from muon_optax._rules import MUON
from muon_optax._rules import Rule
from muon_optax._views import MatrixView


@dataclasses.dataclass(frozen=True)
class Routing:
  """Which parameters get Muon, through which matrix view, and why.

  Three trees with the structure of the params: `labels` (`'muon'` or
  `'adam'`), `views` (a `MatrixView`, None where there is no matrix) and
  `reasons` (a short sentence each). An Adam leaf keeps the view it was read
  with where it has one (an output head, a depthwise or degenerate kernel),
  so `muon_views()` gives the views of the Muon leaves only.
  `muon(lr, param_labels=routing)` takes labels and views together;
  `describe(routing)` prints it. A `Routing` is one opaque value to JAX and
  optax (not a pytree), so `optax.inject_hyperparams` keeps it static.
  """

  labels: Any
  views: Any
  reasons: Any
  # The params' shapes and dtypes (`jax.ShapeDtypeStruct`s), for `describe`.
  shapes: Any = None

  def by_path(self) -> dict[str, Rule]:
    """`{path: Rule(label, view, why)}`, paths as the rest of muon_optax.

    Paths are '/'-joined keys with an NNX Variable's `.value` dropped, e.g.
    `'blocks/0/attn/query/kernel'`.
    """
    labels = _paths.leaves_with_paths(self.labels)
    # Up to the labels' structure: an Equinox module's static fields are
    # None in every tree, and a None view must not be taken for one.
    structure = jax.tree.structure(self.labels)
    views = structure.flatten_up_to(self.views)
    reasons = structure.flatten_up_to(self.reasons)
    return {
      path: Rule(label, view, reason)
      for (path, label), view, reason in zip(
        labels, views, reasons, strict=True
      )
    }

  def muon_views(self) -> Any:
    """`views` with None on every Adam leaf."""
    return jax.tree.map(
      lambda label, view: view if label == MUON else None,
      self.labels,
      self.views,
    )

  def __repr__(self) -> str:
    labels = [rule.label for rule in self.by_path().values()]
    return (
      f'Routing({labels.count(MUON)} muon leaves, '
      f'{labels.count(ADAM)} adam leaves)'
    )

  __str__ = __repr__


# Model libraries are optional: an object can only be one of theirs once the
# user has imported the library, so nothing is imported before that.


def _nnx() -> Any:
  """The NNX integration when flax is loaded, else None."""
  if 'flax.nnx' not in sys.modules:
    return None
  return importlib.import_module('muon_optax._nnx')


def _eqx() -> Any:
  """The Equinox integration when equinox is loaded, else None."""
  if 'equinox' not in sys.modules:
    return None
  return importlib.import_module('muon_optax._equinox')


def is_nnx_module(x: Any) -> bool:
  nnx = _nnx()
  return nnx is not None and nnx.is_module(x)


def is_eqx_module(x: Any) -> bool:
  eqx = sys.modules.get('equinox')
  return eqx is not None and isinstance(x, eqx.Module)


def is_model(x: Any) -> bool:
  """A model object whose layer types can route it: an NNX module, or an
  Equinox module holding arrays (not a label or view tree shaped like one).
  """
  if is_nnx_module(x):
    return True
  return is_eqx_module(x) and any(
    isinstance(leaf, jax.Array) or hasattr(leaf, 'shape')
    for leaf in jax.tree.leaves(x)
  )


def is_tree_builder(x: Any) -> bool:
  """A function from params to a tree, not a tree that happens to be callable.

  NNX and Equinox modules are callable pytrees: they are trees here.
  """
  return (
    callable(x)
    and not isinstance(x, Routing)
    and not is_nnx_module(x)
    and not is_eqx_module(x)
  )


def params_tree(params_or_module: Any) -> Any:
  if is_nnx_module(params_or_module):
    return _nnx().params(params_or_module)
  if is_model(params_or_module):
    return _eqx().params(params_or_module)
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
) -> dict[str, Rule]:
  """`{path: Rule}` for every array leaf; see `param_labels`."""
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
  if stacked and is_model(params_or_module):
    raise ValueError(
      '`stacked` is for plain trees; a model object shows stacked layers by '
      'their shapes (the leading axes a layer does not own are a batch).'
    )
  # The shape-and-name rules, then, for a model object, its layer types.
  rules = _rules.plain_rules(
    params_tree(params_or_module),
    stacked=stacked,
    head_names=head_names,
    embed_names=embed_names,
  )
  if is_nnx_module(params_or_module):
    rules = _nnx().module_rules(params_or_module, rules, head_names)
  elif is_model(params_or_module):
    rules = _eqx().module_rules(params_or_module, rules, head_names)
  tree = params_tree(params_or_module)
  shapes = {p: tuple(np.shape(x)) for p, x in _paths.leaves_with_paths(tree)}
  for path, (label, view, why) in rules.items():
    hit = _paths.match_pattern(view_overrides, path)
    if hit is not None:
      view, why = hit[1], f'view override {hit[0]!r}'
    if label == MUON and view is not None:
      try:
        resolved = view.resolve(shapes[path])
      except ValueError as e:
        raise ValueError(f'Parameter {path!r}: {e}') from None
      if _rules.is_degenerate(
        resolved.matrix_shape, min_side=min_side, max_aspect=max_aspect
      ):
        label, why = ADAM, f'degenerate {resolved.describe()}'
    hit = _paths.match_pattern(overrides or {}, path)
    if hit is not None:
      label, why = hit[1], f'override {hit[0]!r}'
    rules[path] = Rule(label, view, why)
  unmatched = [
    pattern
    for pattern in [*(overrides or {}), *view_overrides]
    if not any(_paths.match_pattern({pattern: None}, p) for p in rules)
  ]
  if unmatched:
    raise ValueError(
      f'The override patterns {unmatched} match no parameter; the paths are '
      f'{sorted(rules)[:20]}{" ..." if len(rules) > 20 else ""}.'
    )
  return rules


def _tree_like(params_or_module: Any, values: Mapping[str, Any]) -> Any:
  tree = params_tree(params_or_module)
  is_var = _nnx().is_variable if is_nnx_module(params_or_module) else None
  return jax.tree_util.tree_map_with_path(
    lambda kp, _: values[_paths.path_str(kp)], tree, is_leaf=is_var
  )


def routing(params_or_module: Any, **kwargs: Any) -> Routing:
  """The rule-based routing (`param_labels`'s rules) as a `Routing`."""
  rules = route(params_or_module, **kwargs)
  tree = params_tree(params_or_module)
  return Routing(
    shapes=jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree
    ),
    labels=_tree_like(params_or_module, {p: r.label for p, r in rules.items()}),
    views=_tree_like(params_or_module, {p: r.view for p, r in rules.items()}),
    reasons=_tree_like(params_or_module, {p: r.why for p, r in rules.items()}),
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
  return _tree_like(params_or_module, {p: r.label for p, r in rules.items()})


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
  return _tree_like(params_or_module, {p: r.view for p, r in rules.items()})


ParamLabels = Any


def label_fn(param_labels: ParamLabels) -> Callable[[Any], Any]:
  """A function from any params tree to its label tree, matched by path."""
  if is_model(param_labels):
    param_labels = routing(param_labels)
  if isinstance(param_labels, Routing):
    param_labels = param_labels.labels

  def labels_for(params):
    if param_labels is None:
      rules = route(params)
      return _paths.map_with_paths(lambda p, _: rules[p].label, params)
    given = (
      param_labels(params) if is_tree_builder(param_labels) else param_labels
    )
    lookup = _paths.PathLookup(given)

    def label(path, _):
      value = lookup.get(path)
      if value is None:
        raise ValueError(
          f'`param_labels` has no label for parameter {path!r}; the label '
          'tree must have the structure of the params (or be a prefix of it).'
        )
      if value not in LABELS:
        raise ValueError(
          f'`param_labels` gives parameter {path!r} the label {value!r}; the '
          f'labels are {list(LABELS)}.'
        )
      return value

    labels = _paths.map_with_paths(label, params)
    if lookup.unused():
      raise ValueError(
        '`param_labels` does not match the params: its entries '
        f'{lookup.unused()} name no parameter.'
      )
    return labels

  return labels_for


MatrixViews = Any  # a view for all leaves, a (prefix) tree, a callable, ...


def view_resolver(
  matrix_views: MatrixViews, tree: Any
) -> Callable[[str, tuple[int, ...]], MatrixView | None]:
  """A function `path, shape -> MatrixView` (None: not a matrix)."""
  if isinstance(matrix_views, Routing):
    matrix_views = matrix_views.views
  elif is_tree_builder(matrix_views) and not isinstance(
    matrix_views, MatrixView
  ):
    matrix_views = matrix_views(tree)

  def default(path, shape):
    return _rules.shape_view(path, shape)[0] if len(shape) >= 2 else None

  if matrix_views is None:
    return default
  if _views.is_view_leaf(matrix_views):
    view = _views.as_matrix_view(matrix_views, '`matrix_views`')
    return lambda path, shape: view
  lookup = _paths.PathLookup(matrix_views, is_leaf=_views.is_view_leaf)

  def resolve(path, shape):
    view = lookup.get(path)
    if view is None:
      return default(path, shape)
    return _views.as_matrix_view(view, f'`matrix_views` at {path!r}')

  return resolve


class BoundLeaf(NamedTuple):
  """A Muon leaf: its index among the tree's leaves, path and bound view."""

  index: int
  path: str
  view: _views.ResolvedView


def bind_views(tree: Any, matrix_views: MatrixViews) -> list[BoundLeaf]:
  """Binds every array leaf of `tree` to its matrix view, or raises."""
  resolver = view_resolver(matrix_views, tree)
  leaves = []
  for i, (path, x) in enumerate(_paths.leaves_with_paths(tree)):
    shape = tuple(np.shape(x))
    dtype = getattr(x, 'dtype', None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f'Parameter {path!r} has dtype {dtype}; Muon updates floating and '
        'complex parameters only. Route it elsewhere with `param_labels`.'
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
    leaves.append(BoundLeaf(i, path, resolved))
  return leaves


def describe(
  params_or_module: Any,
  param_labels: Any = None,
  *,
  matrix_views: Any = None,
  consistent_rms: float | None = 0.2,
) -> str:
  """A table of every parameter: path, shape, label, matrix view, scale, why.

  Args:
    params_or_module: a params tree, a Flax NNX module, or a `Routing`
      (`trace_routing`'s result; it then also gives the labels and views).
    param_labels: as in `muon`: None (the default rules), a label tree, a
      callable, an NNX module or a `Routing`. With a module as first
      argument and None here, the module's rules are used.
    matrix_views: as in `muon`.
    consistent_rms: `muon`'s, for the scale column.

  Returns:
    The table as text, one row per leaf, then a count per label. The `why`
    column is the deciding rule; where given labels overrule it, it says so,
    and a layout the rules had to guess is marked `guessed`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import muon_optax
    >>> params = {'conv': {'kernel': jnp.zeros((3, 3, 16, 32))},
    ...           'head': {'kernel': jnp.zeros((32, 10))}}
    >>> print(muon_optax.describe(params))
    path         shape           label  matrix view  scale  why
    conv/kernel  (3, 3, 16, 32)  muon   144x32       2.400  conv (*spatial, in, out)
    head/kernel  (32, 10)        adam   -            -      output head
    muon: 1 leaves, 4,608 params; adam: 1 leaves, 320 params
  """
  if isinstance(params_or_module, Routing):
    given = params_or_module
    if given.shapes is None:
      raise TypeError(
        'This Routing holds no shapes: pass the params first, '
        '`describe(params, routing)`.'
      )
    params = given.shapes
    rules = given.by_path()
    param_labels = param_labels if param_labels is not None else given
    matrix_views = matrix_views if matrix_views is not None else given
  else:
    params = params_tree(params_or_module)
    if param_labels is None and is_model(params_or_module):
      param_labels = params_or_module
    source = param_labels if is_model(param_labels) else params_or_module
    if isinstance(param_labels, Routing):
      rules = param_labels.by_path()
    else:
      rules = route(source)
    if matrix_views is None and isinstance(param_labels, Routing):
      matrix_views = param_labels
    elif matrix_views is None and is_model(source):
      matrix_views = routing(source)
  labels = dict(_paths.leaves_with_paths(label_fn(param_labels)(params)))
  resolver = view_resolver(matrix_views, params)
  rows = [('path', 'shape', 'label', 'matrix view', 'scale', 'why')]
  totals: dict[str, list[int]] = {}
  for path, x in _paths.leaves_with_paths(params):
    shape = tuple(np.shape(x))
    label = labels[path]
    view_txt, scale_txt = '-', '-'
    if label == MUON:
      resolved = resolver(path, shape).resolve(shape)
      view_txt = resolved.describe()
      scale = _views.shape_scale(*resolved.matrix_shape, consistent_rms)
      scale_txt = f'{scale:.3f}'
    rule = rules.get(path)
    why = rule.why if rule is not None else 'param_labels'
    if rule is not None and rule.label != label:
      why = f'param_labels (rule: {rule.label}, {rule.why})'
    rows.append((path, str(shape), label, view_txt, scale_txt, why))
    count = totals.setdefault(label, [0, 0])
    count[0] += 1
    count[1] += math.prod(shape)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = [
    '  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    for r in rows
  ]
  summary = '; '.join(
    f'{label}: {n} leaves, {size:,} params'
    for label, (n, size) in sorted(totals.items(), reverse=True)
  )
  notes = []
  traced = isinstance(param_labels, Routing)
  if not traced and not any('head' in r.why for r in rules.values()):
    notes.append(
      'note: no output head was found by name; if the model has one, it is '
      'on Muon above (trace_routing finds it from the computation).'
    )
  if not traced and any('guessed' in r.why for r in rules.values()):
    notes.append(
      "note: 'guessed' layouts come from shapes alone; trace_routing reads "
      'them from the computation.'
    )
  return '\n'.join(lines + [summary] + notes)
