"""`qk_clip` and the NNX max-logit recorder against NumPy references."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax
from muon_optax import _flax_attention
from muon_optax import _qk_clip

qk_clip = _qk_clip.qk_clip
max_logit_attention = _flax_attention.max_logit_attention
capture_max_logits = _flax_attention.capture_max_logits
collect_max_logits = _flax_attention.collect_max_logits
MaxLogit = _flax_attention.MaxLogit

TAU = 10.0


def _rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _key(k):
  for attr in ('key', 'idx', 'name'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  raise TypeError(k)


def _flat(tree):
  """{'a/0/b': array}; NNX Variables' trailing `value` dropped."""
  out = {}
  for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [_key(k) for k in kp]
    if keys[-1] == 'value':
      keys.pop()
    out['/'.join(keys)] = np.asarray(x)
  return out


def _per_head(v, ndim, axis):
  """(*layers, heads) values laid along a parameter's layer and head axes."""
  shape = [1] * ndim
  shape[: v.ndim - 1] = v.shape[:-1]
  shape[axis] = v.shape[-1]
  return np.reshape(v, shape)


def _np_clip(params, updates, targets, logits, tau):
  """Post-update weights with QK-Clip, in float64, from the description.

  `targets`: {path: (layer, head axis, power)}; a head h of `layer` with max
  logit S_h > tau has its slice along the head axis of (W + u) multiplied by
  (tau / S_h) ** power.
  """
  p, u = _flat(params), _flat(updates)
  out = {k: p[k].astype(np.float64) + u[k].astype(np.float64) for k in p}
  for path, (layer, axis, power) in targets.items():
    s = np.asarray(logits[layer], np.float64)
    factor = np.where(s > tau, tau / np.maximum(s, tau), 1.0) ** power
    out[path] = out[path] * _per_head(factor, out[path].ndim, axis)
  return out


def _apply(params, updates):
  """`optax.apply_updates` in NumPy: the same float32 sums, no compiling."""
  return jax.tree.map(
    lambda p, u: (np.asarray(p) + np.asarray(u)).astype(p.dtype),
    params,
    updates,
  )


def _clip(tx, updates, params, max_logits):
  """`tx.update` from a fresh state, as one jitted program."""
  return jax.jit(lambda u, p, m: tx.update(u, tx.init(p), p, max_logits=m))(
    updates, params, max_logits
  )


def _check_against_reference(
  params, updates, new_updates, targets, logits, tau=TAU, applied=None
):
  """Clipped heads match `_np_clip`; everything else is plain, bit for bit.

  `applied`: the (clipped, plain) params if already applied.
  """
  if applied is None:
    applied = (_apply(params, new_updates), _apply(params, updates))
  got, plain = map(_flat, applied)
  new_u, u = _flat(new_updates), _flat(updates)
  want = _np_clip(params, updates, targets, logits, tau)
  for path in got:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-6)
    if path not in targets:
      np.testing.assert_array_equal(new_u[path], u[path], err_msg=path)
      np.testing.assert_array_equal(got[path], plain[path], err_msg=path)
      continue
    layer, axis, _ = targets[path]
    clipped = np.asarray(logits[layer]) > tau
    clipped = np.broadcast_to(
      _per_head(clipped, got[path].ndim, axis), got[path].shape
    )
    np.testing.assert_array_equal(
      new_u[path][~clipped], u[path][~clipped], err_msg=path
    )
    np.testing.assert_array_equal(
      got[path][~clipped], plain[path][~clipped], err_msg=path
    )
    if clipped.any():
      assert not np.array_equal(got[path][clipped], plain[path][clipped])


def _mha_params(rng, d=8, heads=4, head_dim=3, kv_heads=None, lead=()):
  kv = heads if kv_heads is None else kv_heads
  return {
    'attn': {
      'query': {
        'kernel': _rand(rng, *lead, d, heads, head_dim),
        'bias': _rand(rng, *lead, heads, head_dim),
      },
      'key': {
        'kernel': _rand(rng, *lead, d, kv, head_dim),
        'bias': _rand(rng, *lead, kv, head_dim),
      },
      'value': {'kernel': _rand(rng, *lead, d, kv, head_dim)},
      'out': {'kernel': _rand(rng, *lead, heads, head_dim, d)},
    },
    'mlp': {'kernel': _rand(rng, d, 2 * d), 'bias': _rand(rng, 2 * d)},
  }


def _updates(rng, params):
  return jax.tree.map(lambda x: _rand(rng, *x.shape) / 10, params)


class QKClipTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    rng = np.random.default_rng(0)
    params = _mha_params(rng)
    updates = _updates(rng, params)
    # Two heads above the threshold, one at it (left alone), one below.
    logits = {'attn': jnp.array([25.0, TAU, 3.0, 40.0])}
    tx = qk_clip(TAU)
    state = tx.init(params)
    update = self.variant(lambda u, s, p, m: tx.update(u, s, p, max_logits=m))
    new_updates, state = update(updates, state, params, logits)
    targets = {
      f'attn/{role}/{name}': ('attn', -2, 0.5)
      for role in ('query', 'key')
      for name in ('kernel', 'bias')
    }
    _check_against_reference(params, updates, new_updates, targets, logits)
    assert int(state.count) == 1
    chex.assert_trees_all_close(state.max_logits, logits)
    gamma = jnp.array([TAU / 25.0, 1.0, 1.0, TAU / 40.0])
    chex.assert_trees_all_close(state.clip_factor, {'attn': gamma})

  def test_stacked_layers(self):
    rng = np.random.default_rng(1)
    params = _mha_params(rng, lead=(3,))
    updates = _updates(rng, params)
    logits = {'attn': _rand(rng, 3, 4) * 10 + TAU}
    tx = qk_clip(TAU)
    new_updates, _ = _clip(tx, updates, params, logits)
    targets = {
      f'attn/{role}/{name}': ('attn', -2, 0.5)
      for role in ('query', 'key')
      for name in ('kernel', 'bias')
    }
    _check_against_reference(params, updates, new_updates, targets, logits)

  def test_grouped_query_attention_clips_the_query_only(self):
    rng = np.random.default_rng(2)
    params = _mha_params(rng, kv_heads=2)
    updates = _updates(rng, params)
    logits = {'attn': jnp.array([30.0, 1.0, 12.0, 1.0])}
    tx = qk_clip(TAU)
    new_updates, _ = _clip(tx, updates, params, logits)
    # The query head takes the whole factor; the shared key heads are plain.
    targets = {
      'attn/query/kernel': ('attn', -2, 1.0),
      'attn/query/bias': ('attn', -2, 1.0),
    }
    _check_against_reference(params, updates, new_updates, targets, logits)

  def test_head_axis_from_matrix_views(self):
    rng = np.random.default_rng(3)
    # A (heads, d, head_dim) layout with nested, explicitly named layers.
    params = {
      'enc': {
        'wq': _rand(rng, 4, 8, 3),
        'wk': _rand(rng, 4, 8, 3),
        'w': _rand(rng, 8, 8),
      }
    }
    updates = _updates(rng, params)
    view = muon_optax.MatrixView((1,), (0, 2))
    views = {'enc': {'wq': view, 'wk': view, 'w': None}}
    tx = qk_clip(TAU, layers={'enc': ('enc/wq', 'enc/wk')}, matrix_views=views)
    logits = {'enc': jnp.array([1.0, 20.0, 11.0, 2.0])}
    new_updates, _ = _clip(tx, updates, params, logits)
    targets = {p: ('enc', 0, 0.5) for p in ('enc/wq', 'enc/wk')}
    _check_against_reference(params, updates, new_updates, targets, logits)

  def test_default_matrix_views_agree_with_names(self):
    rng = np.random.default_rng(4)
    params = _mha_params(rng)
    updates = _updates(rng, params)
    logits = {'attn': jnp.array([25.0, 1.0, 30.0, 1.0])}
    by_name = qk_clip(TAU)
    by_view = qk_clip(TAU, matrix_views=muon_optax.route(params).views)
    a, _ = _clip(by_name, updates, params, logits)
    b, _ = _clip(by_view, updates, params, logits)
    chex.assert_trees_all_equal(a, b)

  def test_attention_found_by_the_trace_whatever_the_names(self):
    """Kernels named `wq`, `wk` in a (heads, d, head_dim) layout: no name
    rule knows them, the traced computation does."""
    rng = np.random.default_rng(6)
    params = {
      'enc': {
        'wq': _rand(rng, 4, 8, 3),
        'wk': _rand(rng, 4, 8, 3),
        'wv': _rand(rng, 4, 8, 3),
        'wo': _rand(rng, 4, 3, 8),
      }
    }

    def attention(p, x):
      e = p['enc']
      q = jnp.einsum('btd,hdk->bhtk', x, e['wq'])
      k = jnp.einsum('btd,hdk->bhtk', x, e['wk'])
      v = jnp.einsum('btd,hdk->bhtk', x, e['wv'])
      w = jax.nn.softmax(jnp.einsum('bhtk,bhsk->bhts', q, k), -1)
      return jnp.einsum('bhts,bhsk,hkd->btd', w, v, e['wo'])

    x = jax.ShapeDtypeStruct((2, 5, 8), jnp.float32)
    routing = muon_optax.trace_routing(attention, params, x)
    assert routing.attention == {'enc': ('enc/wq', 'enc/wk')}
    with self.assertRaisesRegex(ValueError, 'found no attention layer'):
      qk_clip(TAU).init(params)
    tx = qk_clip(TAU, matrix_views=routing)
    updates = _updates(rng, params)
    logits = {'enc': jnp.array([1.0, 20.0, 11.0, 2.0])}
    new_updates, _ = _clip(tx, updates, params, logits)
    targets = {p: ('enc', 0, 0.5) for p in ('enc/wq', 'enc/wk')}
    _check_against_reference(params, updates, new_updates, targets, logits)

  def test_chain_forwards_max_logits_past_other_members(self):
    rng = np.random.default_rng(5)
    params = _mha_params(rng)
    grads = _updates(rng, params)
    logits = {'attn': jnp.array([25.0, 1.0, 30.0, 1.0])}
    # `identity` takes no extra arguments; the chain passes them by it.
    tx = optax.chain(optax.identity(), qk_clip(TAU))
    new_updates, _ = jax.jit(
      lambda g, p: tx.update(g, tx.init(p), p, max_logits=logits, other=1.0)
    )(grads, params)
    updates = grads
    targets = {
      f'attn/{role}/{name}': ('attn', -2, 0.5)
      for role in ('query', 'key')
      for name in ('kernel', 'bias')
    }
    _check_against_reference(params, updates, new_updates, targets, logits)

  def test_nested_max_logits_and_no_bias_scaling(self):
    rng = np.random.default_rng(6)
    params = {'blocks': [_mha_params(rng), _mha_params(rng)]}
    updates = _updates(rng, params)
    logits = {
      'blocks': [
        {'attn': jnp.array([25.0, 1.0, 1.0, 1.0])},
        {'attn': jnp.array([1.0, 1.0, 1.0, 50.0])},
      ]
    }
    tx = qk_clip(TAU, scale_bias=False)
    new_updates, state = _clip(tx, updates, params, logits)
    assert set(state.max_logits) == {'blocks/0/attn', 'blocks/1/attn'}
    flat_logits = {
      'blocks/0/attn': logits['blocks'][0]['attn'],
      'blocks/1/attn': logits['blocks'][1]['attn'],
    }
    targets = {
      f'blocks/{i}/attn/{role}/kernel': (f'blocks/{i}/attn', -2, 0.5)
      for i in (0, 1)
      for role in ('query', 'key')
    }
    _check_against_reference(params, updates, new_updates, targets, flat_logits)


def test_inject_hyperparams_threshold():
  rng = np.random.default_rng(7)
  params = _mha_params(rng)
  updates = _updates(rng, params)
  logits = {'attn': jnp.array([25.0, 1.0, 30.0, 1.0])}
  tx = optax.inject_hyperparams(qk_clip)(threshold=TAU)
  got, state = jax.jit(lambda u, s, p: tx.update(u, s, p, max_logits=logits))(
    updates, tx.init(params), params
  )
  want, _ = _clip(qk_clip(TAU), updates, params, logits)
  chex.assert_trees_all_close(got, want, atol=1e-6)
  assert float(state.hyperparams['threshold']) == TAU


# --- errors ---------------------------------------------------------------


@pytest.mark.parametrize('threshold', [0.0, -1.0, float('nan'), float('inf')])
def test_bad_threshold(threshold):
  with pytest.raises(ValueError, match='threshold'):
    qk_clip(threshold)


def test_bad_construction_arguments():
  with pytest.raises(TypeError, match='layers'):
    qk_clip(layers={'attn': 'attn/query/kernel'})
  with pytest.raises(TypeError, match='layers'):
    qk_clip(layers=3)
  with pytest.raises(TypeError, match='head_axis'):
    qk_clip(head_axis=1.0)
  with pytest.raises(TypeError, match='MatrixView'):
    qk_clip(matrix_views={'attn': 'dense'})


def _init_error(tx, params, match, error=ValueError):
  with pytest.raises(error, match=match):
    tx.init(params)


def test_bad_params_at_init():
  rng = np.random.default_rng(8)
  params = _mha_params(rng)
  _init_error(qk_clip(), {'mlp': params['mlp']}, 'no attention layer')
  _init_error(
    qk_clip(layers=['enc']), params, "key kernel 'enc/key/kernel'|'enc/query"
  )
  _init_error(
    qk_clip(layers={'attn': ('attn/query/kernel', 'attn/k')}),
    params,
    "The key kernel 'attn/k' of attention layer 'attn' is not in the params",
  )
  bad_heads = _mha_params(rng)
  bad_heads['attn']['key']['kernel'] = _rand(rng, 8, 3, 3)
  bad_heads['attn']['key']['bias'] = _rand(rng, 3, 3)
  _init_error(qk_clip(), bad_heads, "'attn/key/kernel' 3")
  flat = {'attn': {'query': {'kernel': _rand(rng, 8, 12)}}}
  flat['attn']['key'] = {'kernel': _rand(rng, 8, 12)}
  _init_error(qk_clip(), flat, "'attn/query/kernel' has shape \\(8, 12\\)")
  _init_error(qk_clip(head_axis=5), params, '`head_axis` 5 is out of range')
  one_out = qk_clip(matrix_views=muon_optax.MatrixView((0, 1), (2,)))
  _init_error(one_out, params, 'one output axis')
  no_view = qk_clip(matrix_views={'attn': {'query': None}})
  _init_error(no_view, params, 'no view for the attention kernel')
  bad_bias = _mha_params(rng)
  bad_bias['attn']['query']['bias'] = _rand(rng, 12)
  _init_error(qk_clip(), bad_bias, 'scale_bias=False')
  qk_clip(scale_bias=False).init(bad_bias)  # fine without the biases


def test_bad_update_arguments():
  rng = np.random.default_rng(9)
  params = _mha_params(rng)
  tx = qk_clip()
  state = tx.init(params)
  ok = {'attn': jnp.ones(4)}
  with pytest.raises(ValueError, match='needs the params'):
    tx.update(params, state, max_logits=ok)
  with pytest.raises(ValueError, match='needs the max attention logits'):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="without an entry: \\['attn'\\]"):
    tx.update(params, state, params, max_logits={'atn': jnp.ones(4)})
  with pytest.raises(ValueError, match="naming no layer: \\['other'\\]"):
    tx.update(params, state, params, max_logits={**ok, 'other': jnp.ones(4)})
  with pytest.raises(ValueError, match=r"\(3,\); attention layer 'attn'"):
    tx.update(params, state, params, max_logits={'attn': jnp.ones(3)})
  with pytest.raises(TypeError, match='floating'):
    tx.update(params, state, params, max_logits={'attn': jnp.ones(4, int)})


# --- the NNX recorder -----------------------------------------------------


def _np_max_logits(q, k, mask=None):
  """Per-head max of q·k/√d over batch and unmasked (query, key), float64."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  rep = q.shape[-2] // k.shape[-2]
  k = np.repeat(k, rep, axis=-2)  # query head h uses key head h // rep
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
  return logits.max(axis=(0, 2, 3))


class _Recorder(nnx.Module):
  """Lets `max_logit_attention` sow into a module outside a layer."""

  def __call__(self, *args, **kwargs):
    return max_logit_attention(*args, module=self, **kwargs)


ATTENTION_CASES = {
  'mask_and_causal': {'mask': 'padding', 'is_causal': True},
  'bias': {'bias': True},
  'gqa_causal': {'kv_heads': 2, 'is_causal': True},
  'dropout': {'dropout_rate': 0.3},
}


@pytest.mark.parametrize('case', list(ATTENTION_CASES))
def test_recording_attention_matches_default(case):
  opts = dict(ATTENTION_CASES[case])
  kv_heads = opts.pop('kv_heads', 4)
  rng = np.random.default_rng(10)
  q = _rand(rng, 2, 5, 4, 8) * 3
  k = _rand(rng, 2, 6 if 'mask' in opts else 5, kv_heads, 8)
  v = _rand(rng, *k.shape)
  np_mask = None
  if opts.get('mask') == 'padding':
    np_mask = np.ones((2, 1, 5, 6), bool)
    np_mask[0, ..., 4:] = False  # the first sequence's last two keys
    np_mask[1, ..., 2] = False
    opts['mask'] = jnp.asarray(np_mask)
  if opts.get('is_causal'):
    causal = np.tril(np.ones((5, k.shape[1]), bool))
    np_mask = causal if np_mask is None else np_mask & causal
  if opts.pop('bias', False):
    opts['bias'] = _rand(rng, 1, 4, 5, 5)
  if opts.get('dropout_rate'):
    opts['dropout_rng'] = jax.random.key(3)

  @jax.jit  # one program per case: cheaper than op-by-op dispatch
  def run(q, k, v):
    want = nnx.dot_product_attention(q, k, v, **opts)
    got, records = nnx.capture(_Recorder(), MaxLogit)(q, k, v, **opts)
    unrecorded = max_logit_attention(q, k, v, **opts)
    return want, got, unrecorded, collect_max_logits(records)

  want, got, unrecorded, recorded = run(q, k, v)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(unrecorded, want, rtol=1e-5, atol=1e-6)
  assert list(recorded) == ['']
  np.testing.assert_allclose(
    recorded[''], _np_max_logits(q, k, np_mask), rtol=1e-5, atol=1e-5
  )


def _mha(rngs, **kwargs):
  return nnx.MultiHeadAttention(
    num_heads=4, in_features=8, decode=False, rngs=rngs, **kwargs
  )


def _recorded(fn):
  return capture_max_logits(lambda m, x: fn(m, x))


def test_multi_head_attention_layer_records_and_matches():
  x = _rand(np.random.default_rng(11), 2, 5, 8)
  plain = _mha(nnx.Rngs(0))
  layer = _mha(nnx.Rngs(0), attention_fn=max_logit_attention)
  nnx.update(layer, nnx.state(plain, nnx.Param))

  @nnx.jit
  def run(plain, layer, x):
    got, max_logits = _recorded(lambda m, x: m(x, sow_weights=True))(layer, x)
    return plain(x), got, max_logits, layer.query(x), layer.key(x)

  want, got, max_logits, q, k = run(plain, layer, x)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    max_logits[''], _np_max_logits(q, k), rtol=1e-5, atol=1e-5
  )
  # Without `sow_weights` NNX does not hand over the module: nothing recorded.
  with pytest.raises(ValueError, match='sow_weights=True'):
    nnx.jit(_recorded(lambda m, x: m(x)))(layer, x)

  # The clip alone (a zero update) brings the heads over τ to exactly τ.
  s = np.asarray(max_logits[''], np.float64)
  tau = float(np.median(s))
  params = nnx.state(layer, nnx.Param)  # NNX Variables, as `init` gets them
  tx = optax.chain(optax.set_to_zero(), qk_clip(tau))
  updates, _ = jax.jit(lambda p, s: tx.update(p, s, p, max_logits=max_logits))(
    params, tx.init(params)
  )
  cut = _flat(_apply(params, updates))
  x64 = np.asarray(x, np.float64)
  proj = lambda r: (
    np.einsum('btd,dhe->bthe', x64, cut[f'{r}/kernel']) + cut[f'{r}/bias']
  )
  np.testing.assert_allclose(
    _np_max_logits(proj('query'), proj('key')), np.minimum(s, tau), rtol=1e-5
  )


def test_layer_called_twice_records_the_larger():
  layer = _mha(nnx.Rngs(0), attention_fn=max_logit_attention)
  x = _rand(np.random.default_rng(12), 1, 5, 8)

  @nnx.jit
  def run(m, x):
    twice = lambda m, x: (m(x, sow_weights=True), m(3 * x, sow_weights=True))
    _, both = _recorded(twice)(m, x)
    _, small = _recorded(lambda m, x: m(x, sow_weights=True))(m, x)
    _, big = _recorded(lambda m, x: m(3 * x, sow_weights=True))(m, x)
    return both, small, big

  both, small, big = run(layer, x)
  chex.assert_trees_all_close(both, jax.tree.map(jnp.maximum, small, big))


def test_collect_pops_records_made_outside_capture():
  layer = _mha(nnx.Rngs(0), attention_fn=max_logit_attention)
  x = _rand(np.random.default_rng(13), 1, 5, 8)

  @nnx.jit
  def run(m, x):
    m(x, sow_weights=True)  # Flax's deprecated path: stored on the module
    return _recorded(lambda m, x: m(x, sow_weights=True))(m, x)[1]

  with pytest.warns(DeprecationWarning, match='capture'):
    want = run(layer, x)
  chex.assert_trees_all_close(collect_max_logits(layer), want)
  with pytest.raises(ValueError, match='No max logits were recorded'):
    collect_max_logits(layer)  # popped


def test_nnx_optimizer_and_capture_in_a_train_step():
  """The documented NNX loop: `nnx.Optimizer.update(..., max_logits=...)`."""
  model = _mha(nnx.Rngs(0), attention_fn=max_logit_attention)
  before = _flat(nnx.state(model, nnx.Param))
  x, y = _rand(np.random.default_rng(15), 2, 5, 8), jnp.zeros((2, 5, 8))
  tau, lr = 0.5, 0.1  # τ under every initial max logit: all heads clip
  optimizer = nnx.Optimizer(
    model, optax.chain(optax.adam(lr), qk_clip(tau)), wrt=nnx.Param
  )

  @nnx.jit
  def train_step(model, optimizer):
    def loss_fn(model):
      out, max_logits = _recorded(lambda m, x: m(x, sow_weights=True))(model, x)
      return jnp.mean((out - y) ** 2), max_logits

    (_, max_logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, max_logits=max_logits)
    return max_logits, grads

  max_logits, grads = train_step(model, optimizer)
  s = np.asarray(max_logits[''], np.float64)
  assert (s > tau).all()
  state = optimizer.opt_state[1]
  assert int(state.count) == 1
  np.testing.assert_allclose(state.clip_factor[''], tau / s, rtol=1e-6)
  after, grads = _flat(nnx.state(model, nnx.Param)), _flat(grads)
  for path in before:
    g = grads[path].astype(np.float64)
    adam_first_step = before[path] - lr * g / (np.abs(g) + 1e-8)
    if path.split('/')[0] in ('query', 'key'):
      adam_first_step = adam_first_step * _per_head(
        np.sqrt(tau / s), g.ndim, g.ndim - 2
      )
    np.testing.assert_allclose(
      after[path], adam_first_step, rtol=1e-5, atol=1e-6, err_msg=path
    )


# --- end to end -----------------------------------------------------------

D, HEADS, T, B = 16, 4, 8, 4


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=HEADS,
      in_features=D,
      decode=False,
      attention_fn=max_logit_attention,
      rngs=rngs,
    )

  def __call__(self, x):
    h = self.norm(x)
    self.sow(nnx.Intermediate, 'attn_input', h)
    return x + self.attn(h, sow_weights=True, is_causal=True)


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([_Block(rngs), _Block(rngs)])
    self.head = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def _np_layer_logits(params, layer, h):
  """Max causal logit per head of attention `layer` on its input h."""
  p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
  proj = lambda r: (
    np.einsum(
      'btd,dhe->bthe', np.asarray(h, np.float64), p[f'{layer}/{r}/kernel']
    )
    + p[f'{layer}/{r}/bias']
  )
  return _np_max_logits(proj('query'), proj('key'), np.tril(np.ones((T, T))))


def test_end_to_end_muon_with_qk_clip():
  """Muon at a large lr with QK-Clip on a 2-block causal NNX Transformer.

  The clip acts on the weights *after* the update but uses the logits of the
  forward pass *before* it, so the new weights' logits are not capped at τ:
  for a clipped head they are γ·S', where S' is the max logit of the
  unclipped updated weights (S' > S when the update grew the logits), and a
  head just under τ may cross it unclipped until the next step. What holds
  exactly, and is checked here on each attention layer's input of that step's
  forward (deeper layers' inputs move with the layers below):

  - the recorded max logits are those of the forward (NumPy reference);
  - clipped heads' post-update q/k weights are √γ × the plain ones, and
    their logits γ × the logits of the plain update;
  - heads under τ and every other parameter are the plain update, bit for
    bit.

  (That the clip alone, with no update, brings the max logit to exactly τ
  is checked in `test_multi_head_attention_layer_records_and_matches`.)
  """
  model = _Model(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(14)
  x, y = _rand(rng, B, T, D), _rand(rng, B, T, D)
  layers = ('blocks/0/attn', 'blocks/1/attn')

  def forward(params):
    m = nnx.merge(graphdef, params)
    out, records, inter = nnx.capture(m, MaxLogit, nnx.Intermediate)(x)
    inputs = {
      f'blocks/{i}/attn': inter['blocks'][i]['attn_input'][0] for i in (0, 1)
    }
    return jnp.mean((out - y) ** 2), (collect_max_logits(records), inputs)

  # Half the first layer's heads start above τ: both branches from step 0.
  # (Its input is the initial LayerNorm of x: scale 1, bias 0, eps 1e-6.)
  x64 = np.asarray(x, np.float64)
  mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
  h0 = (x64 - mean) / np.sqrt(var + 1e-6)
  tau = float(np.median(_np_layer_logits(params, layers[0], h0)))
  # One batched Newton–Schulz for the 16x16 matrices compiles fastest.
  base = muon_optax.muon(learning_rate=0.05, group_strategy='stack')
  clip = qk_clip(tau)
  tx = optax.chain(base, clip)

  @jax.jit
  def step(params, state):
    (_, (s, inputs)), grads = jax.value_and_grad(forward, has_aux=True)(params)
    # `tx.update`, member by member, to keep the update qk_clip received (a
    # second, separately fused Muon update may differ in the last bit).
    plain_updates, base_state = base.update(grads, state[0], params)
    updates, clip_state = clip.update(
      plain_updates, state[1], params, max_logits=s
    )
    state = (base_state, clip_state)
    return s, inputs, updates, plain_updates, state

  # Applied apart from `step` (in NumPy): inside one program XLA may fuse
  # `p + u` with the ops that made `u` (a multiply-add) and round otherwise.
  apply = _apply

  state = tx.init(params)
  clipped_heads = kept_heads = 0
  for _ in range(4):
    s, inputs, updates, plain_updates, new_state = step(params, state)
    new_params, plain = apply(params, updates), apply(params, plain_updates)
    targets = {}
    for layer in layers:
      h = inputs[layer]
      np.testing.assert_allclose(
        s[layer], _np_layer_logits(params, layer, h), rtol=1e-5, atol=1e-5
      )
      for role in ('query', 'key'):
        for name in ('kernel', 'bias'):
          targets[f'{layer}/{role}/{name}'] = (layer, -2, 0.5)
      sv = np.asarray(s[layer], np.float64)
      clipped = sv > tau
      gamma = np.where(clipped, tau / np.maximum(sv, tau), 1.0)
      clipped_heads += clipped.sum()
      kept_heads += (~clipped).sum()
      np.testing.assert_allclose(
        _np_layer_logits(new_params, layer, h),
        gamma * _np_layer_logits(plain, layer, h),
        rtol=1e-5,
        atol=1e-5,
      )
    _check_against_reference(
      params,
      plain_updates,
      updates,
      targets,
      s,
      tau,
      applied=(new_params, plain),
    )
    params, state = new_params, new_state
  assert clipped_heads > 0 and kept_heads > 0
