"""Opt-in per-layer metrics: a transformation that records them, a reader."""

from typing import Any
from typing import NamedTuple

import jax
import optax

from muon_optax import _metrics
from muon_optax import _paths
from muon_optax._transform import MuonState


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
        p: _metrics.zeros(_metrics.UPDATE_METRICS)
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
    stats = {
      path: _metrics.update_metrics(u, weights[path])
      for path, u in _paths.leaves_with_paths(updates)
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
  `orthogonality_error`, `momentum_norm` and `update_rms` (of the
  orthogonalized direction, before shape scaling and learning rate); every
  leaf has `update_rms` and `update_to_weight_rms` of the applied update
  when `record_update_stats` is in the chain (its `update_rms` wins).

  Returns:
    `{path: {metric: scalar}}`; empty if the state holds no metrics.
  """
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
