"""`qk_clip`: QK-Clip (MuonClip of Kimi K2), capping attention logits.

Muon lets attention logits grow until training spikes; Kimi K2 caps them by
rescaling, after each update, the query and key projections of every head
whose largest logit in that step's forward pass exceeded a threshold τ. The
logits are measured by the model (see `muon_optax.max_logit_attention` for
Flax NNX) and handed to the optimizer through optax's extra arguments.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import math
import numbers
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from muon_optax import _paths
from muon_optax import _route
from muon_optax import _routing
from muon_optax import _views

Layers = str | Sequence[str] | Mapping[str, tuple[str, str]] | None


class QKClipState(NamedTuple):
  """State of `qk_clip`: the last step's measurements, for logging."""

  count: jax.Array  # shape=(), dtype=int32
  # {layer path: (*layers, heads)} the max logits handed to the last update.
  max_logits: dict[str, jax.Array]
  # {layer path: (*layers, heads)} γ = min(1, τ / max logit): the factor the
  # last update put on each head's logits (1 where a head was not clipped).
  clip_factor: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class _Target:
  """One parameter that QK-Clip rescales: a q/k kernel or bias."""

  path: str
  layer: str
  head_axis: int  # non-negative, after the layer's leading (stack) axes
  power: float  # the parameter is multiplied by γ ** power


@dataclasses.dataclass(frozen=True)
class _Plan:
  shapes: dict[str, tuple[int, ...]]  # layer -> (*layers, heads)
  targets: dict[str, _Target]  # parameter path -> target


def _check_threshold(threshold: Any) -> None:
  if isinstance(threshold, numbers.Real) and not (
    math.isfinite(threshold) and threshold > 0
  ):
    raise ValueError(
      f'`threshold` must be a positive finite number, got {threshold=}.'
    )


def _normalize_layers(layers: Layers) -> dict[str, tuple[str, str]] | None:
  """Checks the `layers` argument; {layer: (query kernel, key kernel)}."""
  if layers is None:
    return None
  if isinstance(layers, str):
    layers = (layers,)
  if isinstance(layers, Mapping):
    out = {}
    for layer, kernels in layers.items():
      ok = (
        isinstance(layer, str)
        and isinstance(kernels, Sequence)
        and not isinstance(kernels, str)
        and len(kernels) == 2
        and all(isinstance(k, str) for k in kernels)
      )
      if not ok:
        raise TypeError(
          '`layers` maps each attention layer path to a pair of parameter '
          f'paths (query kernel, key kernel); got {layer!r}: {kernels!r}.'
        )
      out[layer] = (kernels[0], kernels[1])
    return out
  if isinstance(layers, Sequence) and all(isinstance(x, str) for x in layers):
    return {x: (f'{x}/query/kernel', f'{x}/key/kernel') for x in layers}
  raise TypeError(
    '`layers` must be None (every `<layer>/query/kernel` with a '
    '`<layer>/key/kernel`), a sequence of layer paths, or a mapping '
    f'{{layer path: (query kernel path, key kernel path)}}; got {layers!r}.'
  )


def _find_layers(params: Any, matrix_views: Any) -> dict[str, Any]:
  """The attention layers of a `Routing` (`matrix_views`, if one), else of
  the source that reads `params`: {layer: (query kernel, key kernel)}."""
  if isinstance(matrix_views, _routing.Routing):
    attention, source = matrix_views.attention, matrix_views.source
  else:
    found = _route.source_of(params)  # its decisions: nothing to finish
    attention, source = found.attention, found.name
  if not attention:
    raise ValueError(
      f'qk_clip found no attention layer (read by {source}): the names '
      "rules know Flax `MultiHeadAttention` kernels ('<layer>/query/kernel' "
      "with '<layer>/key/kernel'), an NNX module its `MultiHeadAttention` "
      'layers, and `trace_routing` the projections whose outputs meet in an '
      'attention score. Pass such a Routing as `matrix_views`, or name the '
      'kernels with `layers`.'
    )
  return dict(attention)


def _view_lookup(matrix_views: Any):
  if matrix_views is None:
    return None
  if isinstance(matrix_views, _routing.Routing):
    matrix_views = matrix_views.views
  if _views.is_view_leaf(matrix_views):
    view = _views.as_matrix_view(matrix_views, '`matrix_views`')
    return lambda path: view
  lookup = _paths.PathLookup(matrix_views, is_leaf=_views.is_view_leaf)
  return lookup.get


def _kernel_axes(
  path: str,
  shape: tuple[int, ...],
  head_axis: int,
  view_of,
) -> tuple[int, int]:
  """(number of leading stack axes, head axis) of a q/k kernel."""
  ndim = len(shape)
  if view_of is not None:
    view = view_of(path)
    if view is None:
      raise ValueError(
        f'`matrix_views` has no view for the attention kernel {path!r}; '
        'give it one whose output axes are (heads, head_dim).'
      )
    view = _views.as_matrix_view(view, f'`matrix_views` at {path!r}')
    try:
      resolved = view.resolve(shape)
    except ValueError as e:
      raise ValueError(f'Attention kernel {path!r}: {e}') from None
    if len(resolved.output_axes) < 2:
      raise ValueError(
        f'The matrix view of the attention kernel {path!r} (shape {shape}) '
        f'is {view}, with one output axis: it does not say which axis holds '
        'the heads. QK-Clip needs output axes (heads, head_dim), e.g. '
        '`MatrixView.general(1, 2)`.'
      )
    lead = len(resolved.batch_axes)
    if resolved.batch_axes != tuple(range(lead)):
      raise ValueError(
        f'The matrix view of the attention kernel {path!r} (shape {shape}) '
        f'has batch axes {resolved.batch_axes}; stacked layers must be the '
        'leading axes.'
      )
    return lead, resolved.output_axes[0]
  if ndim < 3:
    raise ValueError(
      f'The attention kernel {path!r} has shape {shape}; QK-Clip needs a '
      'head axis, as in (d, heads, head_dim) (give `matrix_views` for other '
      'layouts).'
    )
  if not -ndim <= head_axis < ndim:
    raise ValueError(
      f'`head_axis` {head_axis} is out of range for the attention kernel '
      f'{path!r} of shape {shape}.'
    )
  lead = ndim - 3  # the layer's own kernel has 3 axes; the rest are a stack
  axis = head_axis % ndim
  if axis < lead:
    raise ValueError(
      f'`head_axis` {head_axis} of the attention kernel {path!r} (shape '
      f'{shape}) falls on a leading stack axis.'
    )
  return lead, axis


def _bias_path(kernel_path: str) -> str | None:
  parts = kernel_path.split('/')
  if parts[-1] != 'kernel':
    return None
  return '/'.join(parts[:-1] + ['bias'])


def _plan(
  params: Any,
  layers: dict[str, tuple[str, str]] | None,
  head_axis: int,
  matrix_views: Any,
  scale_bias: bool,
) -> _Plan:
  """Which parameters to rescale, along which axis; raises on a mismatch."""
  if params is None:
    raise ValueError(
      'qk_clip needs the params: call `update(updates, state, params, '
      'max_logits=...)` (`nnx.Optimizer.update` passes them).'
    )
  shapes = {p: tuple(np.shape(x)) for p, x in _paths.leaves_with_paths(params)}
  if layers is None:
    layers = _find_layers(params, matrix_views)
  view_of = _view_lookup(matrix_views)
  logit_shapes = {}
  targets = {}
  for layer, (q_path, k_path) in layers.items():
    axes = {}
    for role, path in (('query', q_path), ('key', k_path)):
      if path not in shapes:
        near = sorted(p for p in shapes if p.startswith(layer))[:8]
        raise ValueError(
          f'The {role} kernel {path!r} of attention layer {layer!r} is not '
          f'in the params; parameters under {layer!r}: {near}.'
        )
      axes[role] = _kernel_axes(path, shapes[path], head_axis, view_of)
    (q_lead, q_axis), (k_lead, k_axis) = axes['query'], axes['key']
    q_shape, k_shape = shapes[q_path], shapes[k_path]
    if q_shape[:q_lead] != k_shape[:k_lead]:
      raise ValueError(
        f'Attention layer {layer!r}: the query kernel {q_path!r} '
        f'{q_shape} and the key kernel {k_path!r} {k_shape} have different '
        'stack axes.'
      )
    q_heads, k_heads = q_shape[q_axis], k_shape[k_axis]
    if q_heads == k_heads:
      powers = {q_path: 0.5, k_path: 0.5}
    elif k_heads and q_heads % k_heads == 0:
      # Grouped-query attention: a key head serves several query heads, so
      # (as Kimi K2 does for MLA's shared rotary key) the key is left alone
      # and each query head takes its whole factor.
      powers = {q_path: 1.0}
    else:
      raise ValueError(
        f'Attention layer {layer!r}: the query kernel {q_path!r} has '
        f'{q_heads} heads (axis {q_axis} of {q_shape}) and the key kernel '
        f'{k_path!r} {k_heads} (axis {k_axis} of {k_shape}); the query '
        'heads must equal the key heads or be a multiple of them.'
      )
    logit_shapes[layer] = q_shape[:q_lead] + (q_heads,)
    for path, power in powers.items():
      lead, axis = axes['query' if path == q_path else 'key']
      shape = shapes[path]
      heads = shape[axis]
      for target in (path, _bias_path(path) if scale_bias else None):
        if target is None or target not in shapes:
          continue
        if target != path:
          # The bias holds the kernel's output axes: same axis from the end.
          b_shape = shapes[target]
          b_axis = len(b_shape) - (len(shape) - axis)
          if (
            b_axis < lead
            or b_shape[:lead] != shape[:lead]
            or b_shape[b_axis] != heads
          ):
            raise ValueError(
              f'The bias {target!r} {b_shape} of the attention kernel '
              f'{path!r} {shape} has no head axis matching the kernel; '
              'pass `scale_bias=False` to leave biases alone.'
            )
          axis_t = b_axis
        else:
          axis_t = axis
        if target in targets:
          raise ValueError(
            f'The parameter {target!r} belongs to two attention layers, '
            f'{targets[target].layer!r} and {layer!r}.'
          )
        targets[target] = _Target(target, layer, axis_t, power)
  return _Plan(logit_shapes, targets)


def _check_logits(max_logits: Any, plan: _Plan) -> dict[str, jax.Array]:
  """{layer: max logits}, checked against the layers and their heads."""
  if max_logits is None:
    raise ValueError(
      'qk_clip needs the max attention logits of the step: call '
      "`update(updates, state, params, max_logits={'<layer path>': "
      '(heads,) array, ...})`; `optax.chain` forwards it.'
    )
  given = dict(_paths.leaves_with_paths(max_logits))
  missing = sorted(set(plan.shapes) - set(given))
  unknown = sorted(set(given) - set(plan.shapes))
  if missing or unknown:
    raise ValueError(
      '`max_logits` must have one entry per attention layer, keyed by the '
      f'layer path. Layers without an entry: {missing}; entries naming no '
      f'layer: {unknown}; the layers are {sorted(plan.shapes)}.'
    )
  out = {}
  for layer, shape in plan.shapes.items():
    x = jnp.asarray(given[layer])
    if x.shape != shape:
      raise ValueError(
        f'`max_logits[{layer!r}]` has shape {x.shape}; attention layer '
        f'{layer!r} needs {shape} ((*stacked layers, query heads)).'
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(
        f'`max_logits[{layer!r}]` has dtype {x.dtype}; it must be floating.'
      )
    out[layer] = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return out


def _clip_leaf(
  target: _Target,
  update: jax.Array,
  param: jax.Array,
  clip: jax.Array,
  factor: jax.Array,
) -> jax.Array:
  """The update that lands `param` on `(param + update) * factor ** power`.

  Heads that are not clipped keep `update` itself, bit for bit.
  """
  shape = [1] * update.ndim
  lead = factor.ndim - 1
  shape[:lead] = factor.shape[:lead]
  shape[target.head_axis] = factor.shape[-1]
  dtype = jnp.promote_types(update.dtype, jnp.float32)
  scale = factor if target.power == 1.0 else jnp.sqrt(factor)
  scale = scale.astype(dtype).reshape(shape)
  p = param.astype(dtype)
  clipped = ((p + update.astype(dtype)) * scale - p).astype(update.dtype)
  return jnp.where(clip.reshape(shape), clipped, update)


def qk_clip(
  threshold: jax.typing.ArrayLike = 100.0,
  *,
  layers: Layers = None,
  head_axis: int | None = None,
  matrix_views: Any = None,
  scale_bias: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""QK-Clip: rescales W_q and W_k of heads whose max logit exceeded τ.

  For each attention head h with largest pre-softmax logit
  :math:`S_h = \max_{b,i,j} q_{h,i} \cdot k_{h,j} / \sqrt{d}` in the step's
  forward pass above the threshold τ, the weights *after* the update are

  .. math::
    W_q^h \leftarrow \sqrt{\gamma_h}\, W_q^h, \quad
    W_k^h \leftarrow \sqrt{\gamma_h}\, W_k^h, \quad
    \gamma_h = \tau / S_h,

  which brings the logits that were measured down to τ (the logits are
  bilinear in the two projections). Heads with :math:`S_h \le \tau` and every
  other parameter keep their update bit for bit. Kimi K2 (τ = 100) trained
  15.5T tokens with Muon this way without a loss spike.

  Put it last in a chain, after the learning rate, so that it sees the update
  that will be applied, and hand it the step's max logits as an extra
  argument: `optax.chain` passes extra keyword arguments on to the members
  that take them (`GradientTransformationExtraArgs`), and
  `nnx.Optimizer.update(model, grads, max_logits=...)` passes them on to the
  chain. The logits are those of the weights *before* the update, so the
  clip lags by the update: the clipped weights give logits of
  :math:`\gamma_h S_h'`, where :math:`S_h'` is the max logit of the unclipped
  updated weights, slightly above τ when the update grew the logits; the next
  step clips again.

  Which parameters: by default every Flax `MultiHeadAttention` layer in the
  params, i.e. each `<layer>/query/kernel` with a `<layer>/key/kernel`
  (shape `(d, heads, head_dim)`, heads on axis -2); the projections' biases
  (`<layer>/query/bias`, `(heads, head_dim)`) are rescaled with their kernels
  so that q and k scale exactly. Leading axes beyond the kernel's three are
  stacked layers (`nnx.scan`/`nnx.vmap`), and the max logits then carry them
  too. With grouped-query attention (fewer key than query heads) each key
  head is shared, so the key is left alone and the query head takes the
  whole factor γ, as Kimi K2 does for MLA's shared rotary key.

  QK-norm (`normalize_qk=True`) or a logit soft-cap bound the logits by
  other means; with QK-norm the kernels' scale does not reach the logits and
  this transformation cannot cap them.

  Args:
    threshold: τ, the largest max logit left alone (Kimi K2: 100).
    layers: None (the attention layers of the `Routing` given as
      `matrix_views`, else of `muon_optax.route(params)`: Flax
      `MultiHeadAttention` layers by their names), a sequence of layer paths
      (each with `query/kernel` and `key/kernel` under it), or a mapping
      `{layer path: (query kernel path, key kernel path)}`. Paths are
      '/'-joined keys, e.g. `'blocks/0/attn'`, as `muon_optax` writes them
      for every tree (NNX Variables' `.value` dropped).
    head_axis: the heads' axis of a q/k kernel without a matrix view; None
      is -2, Flax's `(d, heads, head_dim)` (None rather than -2 so that
      `optax.inject_hyperparams(qk_clip)` needs no `static_args`).
    matrix_views: None, a `Routing` (`route(model)`, `trace_routing(...)`:
      its attention layers and views), one `MatrixView` for all q/k kernels,
      or a (prefix) tree of them: the head axis of a kernel is the first
      output axis of its view, and its batch axes are stacked layers.
    scale_bias: rescale each kernel's sibling `bias`, if any, with it.

  Returns:
    A `GradientTransformationExtraArgs` whose `update` takes `params` and
    `max_logits`: `{layer path: (*stacked layers, query heads) array}` (a
    nested dict keyed the same way works too), the step's max logit of every
    head. Its state is a `QKClipState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import muon_optax
    >>> params = {'attn': {'query': {'kernel': jnp.ones((4, 2, 3))},
    ...                    'key': {'kernel': jnp.ones((4, 2, 3))}}}
    >>> tx = optax.chain(optax.sgd(0.0), muon_optax.qk_clip(threshold=25.0))
    >>> state = tx.init(params)
    >>> grads = optax.tree.zeros_like(params)
    >>> updates, state = tx.update(grads, state, params,
    ...                            max_logits={'attn': jnp.array([100., 5.])})
    >>> new = optax.apply_updates(params, updates)
    >>> new['attn']['query']['kernel'][0]  # head 0 took sqrt(25 / 100)
    Array([[0.5, 0.5, 0.5],
           [1. , 1. , 1. ]], dtype=float32)

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence
    <https://arxiv.org/abs/2507.20534>`_, 2025 (MuonClip, QK-Clip).
  """
  _check_threshold(threshold)
  if head_axis is None:
    head_axis = -2
  elif not isinstance(head_axis, int) or isinstance(head_axis, bool):
    raise TypeError(f'`head_axis` must be an int or None, got {head_axis!r}.')
  checkable = not isinstance(matrix_views, _routing.Routing)
  if checkable and not _views.is_view_leaf(matrix_views):
    entries = _paths.PathLookup(matrix_views, is_leaf=_views.is_view_leaf)
    for path, view in entries.entries.items():
      if view is not None:
        _views.as_matrix_view(view, f'`matrix_views` at {path!r}')
  layer_map = _normalize_layers(layers)

  def plan_for(params):
    return _plan(params, layer_map, head_axis, matrix_views, scale_bias)

  def init_fn(params):
    plan = plan_for(params)
    return QKClipState(
      count=jnp.zeros([], jnp.int32),
      max_logits={k: jnp.zeros(s, jnp.float32) for k, s in plan.shapes.items()},
      clip_factor={k: jnp.ones(s, jnp.float32) for k, s in plan.shapes.items()},
    )

  def update_fn(updates, state, params=None, *, max_logits=None, **extra):
    del extra  # `optax.chain` hands every member all extra arguments
    plan = plan_for(params)
    logits = _check_logits(max_logits, plan)
    tau = jnp.asarray(threshold, jnp.float32)
    clip = {k: s > tau for k, s in logits.items()}
    factor = {
      k: jnp.where(clip[k], tau / jnp.where(clip[k], s, 1.0), 1.0)
      for k, s in logits.items()
    }
    param_at = dict(_paths.leaves_with_paths(params))

    def clip_leaf(path, u):
      target = plan.targets.get(path)
      if target is None:
        return u
      if np.shape(param_at[path]) != u.shape:
        raise ValueError(
          f'The update at {path!r} has shape {u.shape}, the parameter '
          f'{np.shape(param_at[path])}.'
        )
      return _clip_leaf(
        target, u, param_at[path], clip[target.layer], factor[target.layer]
      )

    new_updates = _paths.map_with_paths(clip_leaf, updates)
    return new_updates, QKClipState(
      count=optax.safe_increment(state.count),
      max_logits={k: v.astype(jnp.float32) for k, v in logits.items()},
      clip_factor={k: v.astype(jnp.float32) for k, v in factor.items()},
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
