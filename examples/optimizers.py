"""The optimizers under comparison, with one schedule shape for all.

Every optimizer is built with a *unit* peak learning rate; the training loop
multiplies each leaf's update by its own peak learning rate (a traced tree of
scalars). With no coupled weight decay that is exactly the optimizer at that
learning rate, and one compiled train step serves a whole learning-rate grid
instead of one compilation per grid point.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import muon_optax

OPTIMIZERS = ('muon', 'adamw', 'sgd', 'optax_muon')


def schedule(total_steps: int, warmup_frac: float = 0.1) -> optax.Schedule:
  """Linear warm-up to 1, then linear decay to 0: the shape every run uses."""
  warmup = max(1, int(round(warmup_frac * total_steps)))
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, 1.0, warmup),
      optax.linear_schedule(1.0, 0.0, max(1, total_steps - warmup)),
    ],
    [warmup],
  )


@dataclasses.dataclass(frozen=True)
class MuonConfig:
  """How `muon` (muon_optax) is set up for a task.

  Attributes:
    scaling: `scale_by_muon`'s shape scaling, `'jordan'` or `'rms'`.
    adam_lr_ratio: the Adam part's peak learning rate over Muon's; the grid
      moves both together.
    overrides: `muon_optax.param_labels` overrides, `(pattern, label)`
      pairs.
    beta: Muon's momentum.
    ns_steps: Newton–Schulz steps.
    diagnostics: record Muon's per-layer metrics (`muon_optax.diagnostics`);
      costs one more Gram matmul per matrix and step, so it is off for the
      timed comparisons.
  """

  scaling: str = 'rms'
  adam_lr_ratio: float = 1.0
  overrides: tuple[tuple[str, str], ...] = ()
  beta: float = 0.95
  ns_steps: int = 5
  diagnostics: bool = False


def _muon_labels(model: nnx.Module, muon_config: MuonConfig) -> Any:
  return muon_optax.param_labels(model, overrides=dict(muon_config.overrides))


def build(
  name: str,
  model: nnx.Module,
  total_steps: int,
  muon_config: MuonConfig,
) -> optax.GradientTransformation:
  """`name` with the shared schedule shape and a unit peak learning rate."""
  sched = schedule(total_steps)
  if name == 'adamw':
    return optax.adamw(sched, weight_decay=0.0)
  if name == 'sgd':
    return optax.sgd(sched, momentum=0.9, nesterov=True)
  if name == 'optax_muon':
    return optax.contrib.muon(sched)
  if name == 'muon':
    return muon_optax.muon(
      sched,
      scaling=muon_config.scaling,
      beta=muon_config.beta,
      ns_steps=muon_config.ns_steps,
      param_labels=_muon_labels(model, muon_config),
      matrix_views=muon_optax.matrix_views(model),
      diagnostics=muon_config.diagnostics,
    )
  raise ValueError(f'Unknown optimizer {name!r}; known: {list(OPTIMIZERS)}.')


def leaf_lrs(
  name: str,
  model: nnx.Module,
  params: Any,
  lr: float,
  muon_config: MuonConfig,
) -> Any:
  """Each leaf's peak learning rate, a tree with the structure of `params`."""
  leaves = jax.tree.leaves(params)
  if name == 'muon':
    ratio = muon_config.adam_lr_ratio
    labels = jax.tree.leaves(_muon_labels(model, muon_config))
    values = [lr if label == 'muon' else lr * ratio for label in labels]
  else:
    values = [lr] * len(leaves)
  return jax.tree.unflatten(
    jax.tree.structure(params), [jnp.float32(v) for v in values]
  )


def describe(model: nnx.Module, muon_config: MuonConfig) -> str:
  """`muon_optax.describe` of `model` as `build('muon', ...)` routes it."""
  return muon_optax.describe(
    model,
    _muon_labels(model, muon_config),
    matrix_views=muon_optax.matrix_views(model),
    scaling=muon_config.scaling,
  )


def layer_metrics(opt_state: Any, learning_rate: float) -> dict[str, Any]:
  """Per Muon layer: orthogonality error, applied update RMS ÷ weight RMS.

  The optimizers here run at a unit peak learning rate and the train step
  multiplies Muon's updates by `learning_rate`, so the update-to-weight ratio
  the optimizer recorded is scaled by it (no weight decay is in play).
  """
  metrics = muon_optax.diagnostics(opt_state)
  return {
    path: {
      'orthogonality_error': float(m['orthogonality_error']),
      'update_to_weight_rms': float(m['update_to_weight_rms']) * learning_rate,
    }
    for path, m in metrics.items()
    if 'orthogonality_error' in m
  }


def apply_lrs(updates: Any, lrs: Any) -> Any:
  return jax.tree.map(lambda u, lr: (u * lr).astype(u.dtype), updates, lrs)
