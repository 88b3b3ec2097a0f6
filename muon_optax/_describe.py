"""`describe`: a routing as a table, one row per parameter."""

import math
from typing import Any

import numpy as np

from muon_optax import _binding
from muon_optax import _paths
from muon_optax import _route
from muon_optax import _views
from muon_optax._routing import HEAD
from muon_optax._routing import MUON
from muon_optax._routing import Routing


def describe(
  params_or_module: Any,
  param_labels: Any = None,
  *,
  matrix_views: Any = None,
  consistent_rms: float | str | None = 0.2,
) -> str:
  """A table of every parameter: path, shape, label, matrix view, scale, why.

  Args:
    params_or_module: a `Routing` (`route`'s or `trace_routing`'s), a Flax
      NNX or Equinox module, or a params tree (routed by names and shapes).
    param_labels: as in `muon`, to show what `muon` would do with them: None
      (the routing of the first argument), a label tree, a callable, a
      module or a `Routing`.
    matrix_views: as in `muon`; None takes the views of the routing.
    consistent_rms: `muon`'s, for the scale column.

  Returns:
    The table as text, one row per leaf, then a count per label and the
    routing's warnings. The `why` column is the deciding rule; where given
    labels overrule it, it says so; a layout read from the shape alone says
    `guessed`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import muon_optax
    >>> params = {'conv': {'kernel': jnp.zeros((3, 3, 16, 32))},
    ...           'head': {'kernel': jnp.zeros((32, 10))}}
    >>> print(muon_optax.describe(params))
    path         shape           label  matrix view  scale  why
    conv/kernel  (3, 3, 16, 32)  muon   144x32       2.400  conv (*spatial, in, out)
    head/kernel  (32, 10)        adam   -            -      output head; named 'head'; matrix
    muon: 1 leaves, 4,608 params; adam: 1 leaves, 320 params
  """
  _route.refuse_linen(params_or_module, 'The object to describe')
  if isinstance(params_or_module, Routing):
    routing = params_or_module
  elif _route.is_model(params_or_module):
    routing = _route.route(params_or_module)
  else:
    routing = _binding.as_routing(param_labels)
    if routing is None:
      routing = _route.route(params_or_module)
  params = routing.shapes
  rules = routing.by_path()
  if param_labels is None:
    param_labels = routing
  if matrix_views is None:
    given = _binding.as_routing(param_labels)
    matrix_views = given if given is not None else routing
  labels = dict(
    _paths.leaves_with_paths(_binding.label_fn(param_labels)(params))
  )
  resolver = _binding.view_resolver(matrix_views, params)
  rows = [('path', 'shape', 'label', 'matrix view', 'scale', 'why')]
  totals: dict[str, list[int]] = {}
  for path, x in _paths.leaves_with_paths(params):
    shape = tuple(np.shape(x))
    label = labels[path]
    view_txt, scale_txt = '-', '-'
    if label == MUON:
      view = resolver(path, shape)
      if view is None:
        raise ValueError(
          f'Parameter {path!r} of shape {shape} is labelled muon but is not '
          "a matrix (Muon needs at least 2 axes). Label it 'adam', or give "
          'it a `matrix_views` entry.'
        )
      resolved = view.resolve(shape)
      view_txt = resolved.describe()
      scale = _views.shape_scale(resolved, consistent_rms)
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
  notes = [f'warning: {w}' for w in routing.warnings]
  defaulted = [
    p for p, r in rules.items() if r.label == MUON and 'by default' in r.why
  ]
  if routing.source == 'names' and defaulted:
    notes.append(
      f'note: {len(defaulted)} leaves have no layout in their names and are '
      "read in Flax's ((in, out), (kh, kw, in, out)); for PyTorch's "
      "(out, in, ...) name them `*.weight`, give `view_overrides={'<path>': "
      'MatrixView((-1,), (-2,))}`, or trace (docs/pytorch.md).'
    )
  if routing.source == 'names' and not any(
    d.kind == HEAD for d in routing.decisions.values()
  ):
    notes.append(
      'note: no output head was found by name; if the model has one, it is '
      "on Muon above: name it with `route(..., overrides={'<head>': "
      "'adam'})` or `head_names`, or read it from the computation with "
      '`trace_routing`.'
    )
  return '\n'.join(lines + [summary] + notes)
