"""Flax NNX: each head's max attention logit, recorded in the forward pass.

`qk_clip` needs, every step, the largest pre-softmax logit of every attention
head. `max_logit_attention` is a drop-in `attention_fn` for
`nnx.MultiHeadAttention` that records it from the logits it computes anyway
(no second forward pass), and `capture_max_logits` / `collect_max_logits`
turn the records into the `{layer path: (heads,)}` dict `qk_clip` takes.
"""

from collections.abc import Callable
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes
import jax
import jax.numpy as jnp

from muon_optax import _paths

#: The name a layer's record takes in the captured state.
RECORD_NAME = 'max_logits'


class MaxLogit(nnx.Intermediate):
  """The `nnx.Intermediate` type `max_logit_attention` records into."""


def _record(module: nnx.Module, logits: jax.Array, mask: Any) -> None:
  seen = logits if mask is None else jnp.where(mask, logits, -jnp.inf)
  head_axis = seen.ndim - 3
  axes = tuple(a for a in range(seen.ndim) if a != head_axis)
  per_head = jax.lax.stop_gradient(jnp.max(seen, axis=axes))
  module.sow(
    MaxLogit,
    RECORD_NAME,
    per_head.astype(jnp.promote_types(per_head.dtype, jnp.float32)),
    # A layer called twice in one step records the larger of the two.
    reduce_fn=jnp.maximum,
    init_fn=lambda: -jnp.inf,
  )


def max_logit_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  bias: jax.Array | None = None,
  mask: jax.Array | None = None,
  broadcast_dropout: bool = True,
  dropout_rng: jax.Array | None = None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype: Any = None,
  precision: Any = None,
  module: nnx.Module | None = None,
  promote_dtype: Any = dtypes.promote_dtype,
  is_causal: bool = False,
) -> jax.Array:
  r"""`nnx.dot_product_attention` that records each head's max logit.

  Computes softmax attention as `nnx.dot_product_attention` does (same
  arguments, same outputs, grouped-query attention included) and, when
  handed a `module`, sows into it the largest logit
  :math:`\max_{b,i,j} q_{h,i} \cdot k_{h,j} / \sqrt{d}` of every head over
  the batch and the unmasked query/key pairs, as a `MaxLogit` named
  `'max_logits'` of shape `(heads,)`. The attention `bias` is not part of
  it: QK-Clip measures (and rescales) the q·k part only.

  `nnx.MultiHeadAttention` hands its `attention_fn` the module only when it
  is called with `sow_weights=True`; with this function that flag records the
  `(heads,)` maxima and not the attention weights. Run the forward under
  `capture_max_logits` (or `nnx.capture(..., MaxLogit)`) to get them back.

  Args:
    query: `(batch..., q_length, heads, depth)`.
    key: `(batch..., kv_length, kv_heads, depth)`.
    value: `(batch..., kv_length, kv_heads, v_depth)`.
    bias: added to the logits; broadcastable to
      `(batch..., heads, q_length, kv_length)`.
    mask: False where attention is masked out; broadcastable like `bias`.
    broadcast_dropout: share the dropout mask over the batch and heads.
    dropout_rng: PRNG key for dropout.
    dropout_rate: dropout rate on the attention weights.
    deterministic: no dropout.
    dtype: the computation dtype (default: from the inputs).
    precision: the einsums' precision.
    module: the layer to record into; None records nothing.
    promote_dtype: promotes `(query, key, value)` to a common dtype.
    is_causal: overlay a causal mask.

  Returns:
    `(batch..., q_length, heads, v_depth)`.

  Examples:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> import muon_optax
    >>> attn = nnx.MultiHeadAttention(
    ...   num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0),
    ...   attention_fn=muon_optax.max_logit_attention)
    >>> forward = muon_optax.capture_max_logits(
    ...   lambda m, x: m(x, sow_weights=True))
    >>> y, max_logits = forward(attn, jnp.ones((1, 5, 8)))
    >>> {k: v.shape for k, v in max_logits.items()}
    {'': (2,)}
  """
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  dtype = query.dtype
  if not query.ndim == key.ndim == value.ndim:
    raise ValueError(
      'query, key and value must have the same rank, got '
      f'{query.shape=}, {key.shape=}, {value.shape=}.'
    )
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(
      f'query and key depths differ: {query.shape=}, {key.shape=}.'
    )
  if key.shape[-3] != value.shape[-3] or key.shape[-2] != value.shape[-2]:
    raise ValueError(
      'key and value must have the same length and heads, got '
      f'{key.shape=}, {value.shape=}.'
    )
  q_heads, kv_heads = query.shape[-2], key.shape[-2]
  if q_heads % kv_heads:
    raise ValueError(
      f'The query heads ({q_heads}) must be a multiple of the key heads '
      f'({kv_heads}).'
    )
  rep = q_heads // kv_heads

  depth = query.shape[-1]
  query = query / jnp.sqrt(depth).astype(dtype)
  # (batch..., heads, q_length, kv_length); grouped query heads are h*rep+g.
  q = query.reshape(query.shape[:-2] + (kv_heads, rep, depth))
  logits = jnp.einsum('...qhgd,...khd->...hgqk', q, key, precision=precision)
  logits = logits.reshape(logits.shape[:-4] + (q_heads,) + logits.shape[-2:])

  masks = [] if mask is None else [mask]
  if is_causal:
    t, s = logits.shape[-2:]
    causal = jnp.tril(jnp.ones((t, s), dtype=dtype))
    target = mask.shape if mask is not None else logits.shape
    masks.append(jnp.broadcast_to(causal, target))
  combined = nnx.combine_masks(*masks, dtype=dtype) if masks else None

  if module is not None:
    _record(module, logits, combined)

  # From here on as `nnx.dot_product_attention_weights`, so outputs agree.
  if bias is not None:
    logits = logits + bias
  if combined is not None:
    logits = jnp.where(combined, logits, jnp.finfo(dtype).min)
  weights = jax.nn.softmax(logits).astype(dtype)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    if broadcast_dropout:
      shape = (1,) * (key.ndim - 2) + weights.shape[-2:]
    else:
      shape = weights.shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))

  w = weights.reshape(weights.shape[:-3] + (kv_heads, rep) + weights.shape[-2:])
  out = jnp.einsum('...hgqk,...khd->...qhgd', w, value, precision=precision)
  return out.reshape(out.shape[:-3] + (q_heads, out.shape[-1]))


def collect_max_logits(records: Any) -> dict[str, jax.Array]:
  """`{layer path: (heads,) max logits}` from what `max_logit_attention` sowed.

  Args:
    records: the `MaxLogit` state returned by `nnx.capture(fn, MaxLogit)` (a
      capture of several types may be passed whole: other types are
      skipped), or a module that recorded outside `nnx.capture` (Flax's
      deprecated `sow` path); the records are then popped off the module, so
      that the next step starts afresh.

  Returns:
    A dict keyed by the attention layers' '/'-joined paths (e.g.
    `'blocks/0/attn'`), which are the prefixes of their parameters' paths
    that `muon_optax.qk_clip` expects.
  """
  if isinstance(records, nnx.Module):
    records = nnx.pop(records, MaxLogit)
  is_var = lambda x: isinstance(x, nnx.Variable)
  flat, _ = jax.tree_util.tree_flatten_with_path(records, is_leaf=is_var)
  found = {}
  for keypath, leaf in flat:
    path = _paths.path_str(keypath)
    if isinstance(leaf, nnx.Variable):
      if not isinstance(leaf, MaxLogit):
        continue
      leaf = leaf.get_value()
    parts = path.split('/')
    if parts[-1] != RECORD_NAME:
      continue
    found['/'.join(parts[:-1])] = leaf
  if not found:
    raise ValueError(
      'No max logits were recorded. Give the attention layers '
      '`attention_fn=muon_optax.max_logit_attention`, call them with '
      '`sow_weights=True` (NNX hands `attention_fn` the module only then), '
      'and run the forward under `muon_optax.capture_max_logits` or '
      '`nnx.capture(fn, muon_optax.MaxLogit)`.'
    )
  return found


def capture_max_logits(
  fn: Callable[..., Any],
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
  """Wraps `fn` to also return the max logits its attention layers recorded.

  `nnx.capture(fn, MaxLogit)` followed by `collect_max_logits`: `fn` is a
  module, a bound method, or a function whose first argument is the module;
  the layer paths are relative to that module.

  Examples:
    Inside a train step (`model` has `max_logit_attention` layers called
    with `sow_weights=True`; `tx` ends in `muon_optax.qk_clip`)::

      def loss_fn(model):
        logits, max_logits = muon_optax.capture_max_logits(model)(x)
        return loss(logits, y), max_logits

      (loss, max_logits), grads = nnx.value_and_grad(
          loss_fn, has_aux=True)(model)
      optimizer.update(model, grads, max_logits=max_logits)
  """
  captured = nnx.capture(fn, MaxLogit)

  def wrapper(*args, **kwargs):
    result, records = captured(*args, **kwargs)
    return result, collect_max_logits(records)

  return wrapper
