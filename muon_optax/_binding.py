"""What `muon` and the transformations are given: label and view arguments
bound to the trees they see.

`param_labels` and `matrix_views` take many forms (a `Routing`, a model, a
tree or prefix tree matched by path, a function of the params, None); this
module turns each into a label tree for `optax.partition` or a matrix view
per leaf for the transformations, and refuses at construction what can never
be one.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from muon_optax import _names
from muon_optax import _paths
from muon_optax import _route
from muon_optax import _routing
from muon_optax import _views
from muon_optax._routing import LABELS
from muon_optax._routing import Routing
from muon_optax._views import MatrixView

ParamLabels = Any
MatrixViews = Any  # a view for all leaves, a (prefix) tree, a callable, ...


def as_routing(param_labels: ParamLabels) -> Routing | None:
  """The `Routing` that `param_labels` stands for, if it is or names one:
  a `Routing`, or an NNX or Equinox module (its `route`)."""
  _route.refuse_linen(param_labels, '`param_labels`')
  if isinstance(param_labels, Routing):
    return param_labels
  if _route.is_model(param_labels):
    return _route.route(param_labels)
  return None


def check_labels_arg(param_labels: ParamLabels) -> None:
  """Raises at construction for what can never be a label tree."""
  _route.refuse_linen(param_labels, '`param_labels`')
  _route.refuse_schedule_value(param_labels, '`param_labels`')


def check_views_arg(matrix_views: MatrixViews) -> None:
  """Raises at construction for what can never be a view tree."""
  _route.refuse_linen(matrix_views, '`matrix_views`')
  _route.refuse_schedule_value(matrix_views, '`matrix_views`')


def is_tree_builder(x: Any) -> bool:
  """A function from params to a tree, not a tree that happens to be callable.

  NNX and Equinox modules are callable pytrees: they are trees here.
  """
  return (
    callable(x)
    and not isinstance(x, (Routing, MatrixView))
    and not _route.is_nnx_module(x)
    and not _route.is_eqx_module(x)
  )


def _is_single_leaf(tree: Any) -> bool:
  return jax.tree_util.treedef_is_leaf(jax.tree.structure(tree))


def given_views(matrix_views: MatrixViews, tree: Any) -> dict[str, MatrixView]:
  """`{path: view}` of the leaves of `tree` that `matrix_views` names (not
  those it leaves to the names rules)."""
  explicit = _explicit_views(matrix_views, tree)
  views = {p: explicit(p) for p, _ in _paths.leaves_with_paths(tree)}
  return {p: v for p, v in views.items() if v is not None}


def default_routing(params: Any, matrix_views: MatrixViews = None) -> Routing:
  """The routing `muon` uses without `param_labels`: `route(params)` (an
  Equinox module's layer types, else the names rules), with the views
  `matrix_views` gives taking the place of the source's own."""
  if _is_single_leaf(params) and hasattr(params, 'shape'):
    source = _names.source(params)  # one array is a whole params tree
  else:
    source = _route.source_of(params)
  return _routing.finish(source, views=given_views(matrix_views, params))


def label_fn(
  param_labels: ParamLabels, matrix_views: MatrixViews = None
) -> Callable[[Any], Any]:
  """A function from any params tree to its label tree, matched by path.

  Without `param_labels`, `default_routing` decides, with `matrix_views`'s
  views for the leaves it names. A function that returns a `Routing` gives
  its labels here; its views must be the ones the transformations will use
  (`view_resolver`), or this raises: a function cannot hand its views to
  them, as they see only the Muon part of the tree.
  """
  check_labels_arg(param_labels)
  given_routing = as_routing(param_labels)
  if given_routing is not None:
    param_labels = given_routing.labels

  def labels_for(params):
    if param_labels is None:
      rules = default_routing(params, matrix_views).by_path()
      # Leaves the sources skip (integer arrays, ...) are not Muon's.
      return _paths.map_with_paths(
        lambda p, _: rules[p].label if p in rules else _routing.ADAM, params
      )
    given = param_labels
    if is_tree_builder(given):
      given = given(params)
      if isinstance(given, Routing):
        _check_views_carry(given, matrix_views, params)
        given = given.labels
      if not _is_single_leaf(params):  # else one label is the whole tree
        _route.refuse_schedule_value(
          given, 'What the `param_labels` function returned'
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


def _check_views_carry(
  routing: Routing, matrix_views: MatrixViews, params: Any
) -> None:
  """Raises unless the transformations will use `routing`'s views for its
  Muon leaves (they resolve views from `matrix_views` and the tree alone)."""
  resolve = view_resolver(matrix_views, params)
  shapes = dict(
    (p, tuple(np.shape(x))) for p, x in _paths.leaves_with_paths(params)
  )
  differ = []
  for path, rule in routing.by_path().items():
    if rule.label != _routing.MUON or path not in shapes:
      continue
    used, given = resolve(path, shapes[path]), rule.view
    if used is None or given is None:
      continue  # muon raises on a Muon leaf without a view, naming it
    if used.resolve(shapes[path]) != given.resolve(shapes[path]):
      differ.append(path)
  if differ:
    raise ValueError(
      f'The `param_labels` function returned a Routing whose matrix views of '
      f'{differ} are not the ones Muon would use (a function gives labels '
      'only). Build the routing once and pass it, '
      '`muon(..., param_labels=routing)`, or pass its views too, '
      '`matrix_views=routing`.'
    )


def default_view(path: str, shape: tuple[int, ...]) -> MatrixView | None:
  """The names-and-shapes view of one leaf (None for fewer than 2 axes)."""
  return _names.shape_view(path, shape)[0] if len(shape) >= 2 else None


def _explicit_views(
  matrix_views: MatrixViews, tree: Any
) -> Callable[[str], MatrixView | None]:
  """The view `matrix_views` names for a path, or None where it names none."""
  check_views_arg(matrix_views)
  if isinstance(matrix_views, Routing):
    matrix_views = matrix_views.views
  elif is_tree_builder(matrix_views):
    matrix_views = matrix_views(tree)
    if isinstance(matrix_views, Routing):
      matrix_views = matrix_views.views
  if matrix_views is None:
    return lambda path: None
  if _views.is_view_leaf(matrix_views):
    view = _views.as_matrix_view(matrix_views, '`matrix_views`')
    return lambda path: view
  lookup = _paths.PathLookup(matrix_views, is_leaf=_views.is_view_leaf)

  def get(path):
    view = lookup.get(path)
    if view is None:
      return None
    return _views.as_matrix_view(view, f'`matrix_views` at {path!r}')

  return get


def view_resolver(
  matrix_views: MatrixViews, tree: Any
) -> Callable[[str, tuple[int, ...]], MatrixView | None]:
  """A function `path, shape -> MatrixView` (None: not a matrix).

  A view `matrix_views` names comes first; then, for an Equinox module, the
  view its layer types give (the source `default_routing` reads the labels
  from); then the names rules'.
  """
  explicit = _explicit_views(matrix_views, tree)
  model = (
    _route.source_of(tree).decisions
    if _route.is_eqx_module(tree) and _route.is_model(tree)
    else {}
  )

  def resolve(path, shape):
    view = explicit(path)
    if view is None and path in model:
      view = model[path].view
    return default_view(path, shape) if view is None else view

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
