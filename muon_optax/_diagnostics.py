"""What Muon does to each layer: a routing table and opt-in step metrics."""

from collections.abc import Mapping
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from muon_optax import _paths
from muon_optax import _views

# Per-leaf metrics are dicts keyed by the parameter path; the names below are
# the keys of each leaf's dict.
ORTHOGONALITY_ERROR = 'orthogonality_error'
MOMENTUM_NORM = 'momentum_norm'
UPDATE_RMS = 'update_rms'
UPDATE_TO_WEIGHT = 'update_to_weight_rms'


def orthogonality_error(o: jax.Array) -> jax.Array:
  r""":math:`\|O O^\top - I\|_F / \sqrt{k}` on the short side, batch-averaged.

  `o` is `(B, m, n)`; `k = min(m, n)`. 0 for an exact polar factor; about
  0.1–0.2 after 5 Newton–Schulz steps (the singular values sit in a band
  around 1, see the README); 1 for a zero matrix.
  """
  *_, m, n = o.shape
  o = o.astype(jnp.float32)
  if m > n:
    gram = jnp.einsum('bmi,bmj->bij', o, o)
  else:
    gram = jnp.einsum('bim,bjm->bij', o, o)
  k = min(m, n)
  err = jnp.sqrt(jnp.sum(jnp.square(gram - jnp.eye(k)), axis=(1, 2)) / k)
  return jnp.mean(err)


def muon_leaf_metrics(o_scaled: jax.Array, scale: float, momentum: jax.Array):
  o_scaled = o_scaled.astype(jnp.float32)
  return {
    ORTHOGONALITY_ERROR: orthogonality_error(o_scaled / scale),
    MOMENTUM_NORM: jnp.sqrt(jnp.sum(jnp.square(momentum.astype(jnp.float32)))),
    UPDATE_RMS: jnp.sqrt(jnp.mean(jnp.square(o_scaled))),
  }


def zero_muon_metrics(tree: Any) -> dict[str, dict[str, jax.Array]]:
  names = (ORTHOGONALITY_ERROR, MOMENTUM_NORM, UPDATE_RMS)
  return {
    path: {k: jnp.zeros([], jnp.float32) for k in names}
    for path, _ in _paths.leaves_with_paths(tree)
  }


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(x, jnp.float32))))


class UpdateStatsState(NamedTuple):
  """State of `record_update_stats`: the last step's metrics, by path."""

  stats: dict[str, dict[str, jax.Array]]


def record_update_stats() -> optax.GradientTransformation:
  """Records every leaf's update RMS and its ratio to the weight RMS.

  Put it last in a chain, after the learning rate, so it sees the updates
  that are applied. It passes the updates through unchanged, and needs
  `params` in `update`.
  """

  def init_fn(params):
    return UpdateStatsState(
      {
        p: {
          UPDATE_RMS: jnp.zeros([], jnp.float32),
          UPDATE_TO_WEIGHT: jnp.zeros([], jnp.float32),
        }
        for p, _ in _paths.leaves_with_paths(params)
      }
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        'record_update_stats needs `params` in `update` to compare the '
        'update with the weights.'
      )
    weights = dict(_paths.leaves_with_paths(params))
    stats = {}
    for path, u in _paths.leaves_with_paths(updates):
      u_rms = _rms(u)
      w_rms = _rms(weights[path])
      stats[path] = {
        UPDATE_RMS: u_rms,
        UPDATE_TO_WEIGHT: u_rms / jnp.maximum(w_rms, 1e-12),
      }
    return updates, UpdateStatsState(stats)

  return optax.GradientTransformation(init_fn, update_fn)


def _value(x):
  get = getattr(x, 'get_value', None)
  return get() if callable(get) else x


def diagnostics(opt_state: Any) -> dict[str, dict[str, jax.Array]]:
  """Collects the per-leaf metrics from an optimizer state, by path.

  Works on the state of `muon(..., diagnostics=True)` (or any chain holding
  `scale_by_muon(diagnostics=True)` and `record_update_stats()`), inside or
  outside jit, and on `nnx.Optimizer.opt_state`. Muon leaves have
  `orthogonality_error`, `momentum_norm` and `update_rms` (of the scaled
  orthogonal direction, before the learning rate); every leaf has
  `update_rms` and `update_to_weight_rms` of the applied update when
  `record_update_stats` is in the chain (its `update_rms` wins).

  Returns:
    `{path: {metric: scalar}}`; empty if the state holds no metrics.
  """
  from muon_optax._transform import MuonState  # pylint: disable=g-import-not-at-top

  is_node = lambda x: isinstance(x, (MuonState, UpdateStatsState))
  found: dict[str, dict[str, Any]] = {}
  nodes = [n for n in jax.tree.leaves(opt_state, is_leaf=is_node) if is_node(n)]
  for node in nodes:
    metrics = node.diagnostics if isinstance(node, MuonState) else node.stats
    for path, values in (metrics or {}).items():
      entry = found.setdefault(path, {})
      for name, v in values.items():
        if isinstance(node, UpdateStatsState) or name not in entry:
          entry[name] = _value(v)
  return found


def _resolve_labels(params: Any, param_labels: Any) -> dict[str, str]:
  from muon_optax import _alias  # pylint: disable=g-import-not-at-top

  labels = _alias._label_fn(param_labels)(params)  # pylint: disable=protected-access
  return dict(_paths.leaves_with_paths(labels))


def describe(
  params_or_module: Any,
  param_labels: Any = None,
  *,
  matrix_views: Any = None,
  scaling: str = 'rms',
) -> str:
  """A table of every parameter: path, shape, label, matrix view, scale, why.

  Args:
    params_or_module: a params tree or a Flax NNX module.
    param_labels: as in `muon`: None (default rules), a label tree, a
      callable, or an NNX module. With a module as first argument and None
      here, the module's rules are used.
    matrix_views: as in `muon`.
    scaling: the `scaling` of `muon`, for the scale column.

  Returns:
    The table as text, one row per leaf, then a count per label.

  Examples:
    >>> import jax.numpy as jnp
    >>> import muon_optax
    >>> params = {'conv': {'kernel': jnp.zeros((3, 3, 16, 32))},
    ...           'head': {'kernel': jnp.zeros((32, 10))}}
    >>> print(muon_optax.describe(params))
    path         shape           label  matrix view  scale  why
    conv/kernel  (3, 3, 16, 32)  muon   144x32       2.400  matrix
    head/kernel  (32, 10)        adam   -            -      output head
    muon: 1 leaves, 4,608 params; adam: 1 leaves, 320 params
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from muon_optax import _routing  # pylint: disable=g-import-not-at-top
  from muon_optax import _transform  # pylint: disable=g-import-not-at-top

  if isinstance(params_or_module, nnx.Module):
    if param_labels is None:
      param_labels = params_or_module
    if matrix_views is None:
      matrix_views = _routing.matrix_views(params_or_module)
    params = nnx.state(params_or_module, nnx.Param)
  else:
    params = params_or_module
  if matrix_views is None and isinstance(param_labels, nnx.Module):
    matrix_views = _routing.matrix_views(param_labels)
  labels = _resolve_labels(params, param_labels)
  reasons = {}
  if param_labels is None or isinstance(param_labels, nnx.Module):
    source = params if param_labels is None else param_labels
    reasons = {p: r[2] for p, r in _routing.route(source).items()}
  resolver = _transform._view_resolver(matrix_views, params)  # pylint: disable=protected-access
  rows = [('path', 'shape', 'label', 'matrix view', 'scale', 'why')]
  totals: dict[str, list[int]] = {}
  for path, x in _paths.leaves_with_paths(params):
    shape = tuple(np.shape(x))
    label = labels[path]
    view_txt, scale_txt = '-', '-'
    if label == 'muon':
      resolved = resolver(path, shape).resolve(shape)
      view_txt = resolved.describe()
      scale_txt = f'{_views.shape_scale(scaling, *resolved.matrix_shape):.3f}'
    why = reasons.get(path, 'param_labels')
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
  return '\n'.join(lines + [summary])


def format_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> str:
  """A one-line-per-leaf text rendering of `diagnostics(...)`."""
  lines = []
  for path in sorted(metrics):
    vals = ', '.join(
      f'{k}={float(v):.4g}' for k, v in sorted(metrics[path].items())
    )
    lines.append(f'{path}: {vals}')
  return '\n'.join(lines)
