"""Routing on real model classes of seven libraries, traced the way each
library's users write a training step.

A BatchNorm step returns new statistics beside the logits, a loss returns
`(loss, aux)`, a backbone returns hidden states: each must route as the
function that returns predictions alone. Every expected label and matrix
shape below was worked out by hand from the model definition. Haiku, keras
and penzai are test extras; their tests skip where they are not installed.
"""

import os

import equinox as eqx
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import muon_optax

X = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
TOKENS = jax.ShapeDtypeStruct((2, 8), jnp.int32)


def _shapes(routing):
  """{path: shape} of a routing's leaves."""
  leaves = jax.tree.leaves(routing.shapes)
  return {
    path: s.shape for path, s in zip(routing.by_path(), leaves, strict=True)
  }


def _rows(routing):
  """{path: (label, matrix shape of the view, for Muon leaves)}."""
  shapes = _shapes(routing)
  return {
    path: (
      rule.label,
      rule.view.resolve(shapes[path]).describe()
      if rule.label == 'muon'
      else None,
    )
    for path, rule in routing.by_path().items()
  }


def _by_rule(routing, expect):
  """Checks every leaf against `expect(path, shape) -> (label, matrix)`."""
  struct = _shapes(routing)
  for path, rule in routing.by_path().items():
    label, matrix = expect(path, struct[path])
    assert rule.label == label, (path, rule)
    if matrix is not None:
      assert rule.view.resolve(struct[path]).describe() == matrix, path


def _conv(shape):
  """A conv kernel (kh, kw, in, out) as Muon's (kh·kw·in) x out matrix."""
  *spatial, cin, cout = shape
  return 'muon', f'{spatial[0] * spatial[1] * cin}x{cout}'


# -- Flax Linen: a BatchNorm training step ----------------------------------


class LinenBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train):
    y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
    y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train)(y)
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), use_bias=False)(x)
    return nn.relu(x + y)


class LinenResNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = LinenBlock(8)(x, train)
    x = LinenBlock(16)(x, train)
    return nn.Dense(10)(x.mean((1, 2)))


LINEN_RESNET = {
  'Conv_0/kernel': ('muon', '27x8'),
  'Conv_0/bias': ('adam', None),
  'BatchNorm_0/scale': ('adam', None),
  'BatchNorm_0/bias': ('adam', None),
  'LinenBlock_0/Conv_0/kernel': ('muon', '72x8'),
  'LinenBlock_0/Conv_1/kernel': ('muon', '72x8'),
  'LinenBlock_1/Conv_0/kernel': ('muon', '72x16'),
  'LinenBlock_1/Conv_1/kernel': ('muon', '144x16'),
  'LinenBlock_1/Conv_2/kernel': ('muon', '8x16'),
  'Dense_0/kernel': ('adam', None),  # the head
  'Dense_0/bias': ('adam', None),
}


def _check_linen_resnet(routing):
  rows = _rows(routing)
  for path, (label, matrix) in rows.items():
    if 'BatchNorm' in path:
      assert (label, matrix) == ('adam', None), path
    else:
      assert (label, matrix) == LINEN_RESNET[path], path
  assert 'output head' in routing.reasons['Dense_0']['kernel']


def test_linen_batchnorm_step_and_loss_with_aux():
  model = LinenResNet()
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros(X.shape), train=False)
  )
  params, stats = variables['params'], variables['batch_stats']

  def step(p, stats, x):  # the usual training step: logits and new state
    return model.apply(
      {'params': p, 'batch_stats': stats}, x, train=True,
      mutable=['batch_stats'],
    )  # fmt: skip

  def loss(p, stats, x):  # a loss with the new statistics as aux
    logits, state = step(p, stats, x)
    return logits.sum(), state

  for fn in (step, loss):
    _check_linen_resnet(muon_optax.trace_routing(fn, params, stats, X))


def test_linen_module_is_refused_with_the_linen_line():
  model = LinenResNet()
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros(X.shape), train=False)
  )
  bound = model.bind(variables)
  for obj in (model, bound):
    for call in (
      lambda obj=obj: muon_optax.route(obj),
      lambda obj=obj: muon_optax.muon(0.1, param_labels=obj),
      lambda obj=obj: muon_optax.describe(obj),
    ):
      with pytest.raises(TypeError, match='Linen module.*trace_routing'):
        call()


# -- Flax Linen: a Transformer that returns hidden states -------------------


class LinenLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(50, 32)(tokens)
    hidden = []
    for _ in range(2):
      h = h + nn.MultiHeadDotProductAttention(4)(nn.LayerNorm()(h))
      h = h + nn.Dense(32)(nn.gelu(nn.Dense(64)(nn.LayerNorm()(h))))
      hidden.append(h)
    logits = nn.Dense(50, name='lm_head')(nn.LayerNorm()(h))
    return logits, hidden


def test_linen_transformer_returning_hidden_states():
  model = LinenLM()
  params = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros(TOKENS.shape, jnp.int32))
  )['params']
  routing = muon_optax.trace_routing(
    lambda p, t: model.apply({'params': p}, t), params, TOKENS
  )
  logits_only = muon_optax.trace_routing(
    lambda p, t: model.apply({'params': p}, t)[0], params, TOKENS
  )
  assert routing.labels == logits_only.labels

  def expect(path, shape):
    if path.startswith('Embed_0') or path.startswith('lm_head'):
      return 'adam', None  # the table (gather) and the head
    if path.endswith('/kernel') and 'Dense' in path:
      return 'muon', f'{shape[0]}x{shape[1]}'
    if path.endswith(('query/kernel', 'key/kernel', 'value/kernel')):
      return 'muon', '32x32'  # (d, heads, head_dim) as d x heads·head_dim
    if path.endswith('out/kernel'):
      return 'muon', '32x32'
    return 'adam', None  # biases, LayerNorms

  _by_rule(routing, expect)
  attention = routing.attention
  assert sorted(attention) == [
    'MultiHeadDotProductAttention_0',
    'MultiHeadDotProductAttention_1',
  ]
  q, k = attention['MultiHeadDotProductAttention_0']
  assert {q.rsplit('/', 2)[-2], k.rsplit('/', 2)[-2]} == {'query', 'key'}


# -- Flax NNX in train mode, statistics returned ----------------------------


class NNXNet(nnx.Module):
  def __init__(self, *, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.classifier = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.classifier(x.mean((1, 2)))


def test_nnx_train_mode_returning_batch_stats():
  model = nnx.eval_shape(lambda: NNXNet(rngs=nnx.Rngs(0)))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(p, rest, x):
    m = nnx.merge(graphdef, p, rest)
    logits = m(x)
    return logits, nnx.state(m, nnx.BatchStat)

  routing = muon_optax.trace_routing(step, params, rest, X)
  rows = _rows(routing)
  assert rows['conv1/kernel'] == ('muon', '27x8')
  assert rows['conv2/kernel'] == ('muon', '72x16')
  assert rows['classifier/kernel'] == ('adam', None)
  assert {r for p, r in rows.items() if 'bn' in p or 'bias' in p} == {
    ('adam', None)
  }
  # The module's own rules agree with the trace, leaf by leaf.
  assert muon_optax.route(model).labels == routing.labels


# -- Equinox: BatchNorm with state, vmapped over the batch ------------------


class EqxNet(eqx.Module):
  conv1: eqx.nn.Conv2d
  bn1: eqx.nn.BatchNorm
  conv2: eqx.nn.Conv2d
  bn2: eqx.nn.BatchNorm
  linear: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(3, 8, 3, padding=1, use_bias=False, key=k1)
    self.bn1 = eqx.nn.BatchNorm(8, axis_name='batch', mode='batch')
    self.conv2 = eqx.nn.Conv2d(8, 16, 3, padding=1, use_bias=False, key=k2)
    self.bn2 = eqx.nn.BatchNorm(16, axis_name='batch', mode='batch')
    self.linear = eqx.nn.Linear(16, 10, key=k3)

  def __call__(self, x, state):
    x, state = self.bn1(self.conv1(x), state)
    x, state = self.bn2(self.conv2(jax.nn.relu(x)), state)
    return self.linear(jax.nn.relu(x).mean((1, 2))), state


def test_equinox_batchnorm_state_returned():
  model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def step(p, x):
    m = eqx.combine(p, static)
    vmapped = jax.vmap(
      m, axis_name='batch', in_axes=(0, None), out_axes=(0, None)
    )
    return vmapped(x, state)

  x = jax.ShapeDtypeStruct((2, 3, 16, 16), jnp.float32)
  routing = muon_optax.trace_routing(step, params, x)
  rows = _rows(routing)
  assert rows['conv1/weight'] == ('muon', '27x8')  # OIHW
  assert rows['conv2/weight'] == ('muon', '72x16')
  assert rows['linear/weight'] == ('adam', None)  # the head, (out, in)
  assert set(rows.values()) - {('muon', '27x8'), ('muon', '72x16')} == {
    ('adam', None)
  }
  # The layer types (the last layer is the head) say the same.
  assert muon_optax.route(model).labels == routing.labels


# -- Haiku ------------------------------------------------------------------


def test_haiku_resnet_with_state():
  hk = pytest.importorskip('haiku')

  def forward(x, is_training):
    net = hk.nets.ResNet(
      blocks_per_group=(1, 1, 1, 1),
      num_classes=10,
      channels_per_group=(8, 16, 16, 16),
      bottleneck=False,
    )
    return net(x, is_training=is_training)

  f = hk.transform_with_state(forward)
  params, state = jax.eval_shape(
    lambda: f.init(jax.random.key(0), jnp.zeros(X.shape), True)
  )

  def step(p, s, x):  # returns (logits, new_state)
    return f.apply(p, s, None, x, True)

  def loss(p, s, x):
    logits, new_state = step(p, s, x)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.zeros(2, jnp.int32)
    ).mean(), new_state

  def expect(path, shape):
    if path.endswith('logits/w'):
      return 'adam', None  # the head
    if path.endswith('/w') and len(shape) == 4:
      return _conv(shape)
    return 'adam', None  # batch norm offsets and scales, biases

  for fn in (step, loss):
    routing = muon_optax.trace_routing(fn, params, state, X)
    _by_rule(routing, expect)
    # 1 stem, 4 blocks of 2 convs, 4 projection shortcuts
    assert sum(1 for r in jax.tree.leaves(routing.labels) if r == 'muon') == 13


def test_haiku_one_hot_embedding_and_layer_stack():
  hk = pytest.importorskip('haiku')

  def lm(tokens):
    h = hk.Embed(50, 32, lookup_style='ONE_HOT')(tokens)

    def layer(h):
      return h + hk.Linear(32)(jax.nn.gelu(hk.Linear(64)(h)))

    h = hk.layer_stack(3)(layer)(h)
    return hk.Linear(50, name='out')(h)

  f = hk.transform(lm)
  params = jax.eval_shape(
    lambda: f.init(jax.random.key(0), jnp.zeros(TOKENS.shape, jnp.int32))
  )
  routing = muon_optax.trace_routing(
    lambda p, t: f.apply(p, None, t), params, TOKENS
  )
  rows = _rows(routing)
  stack = '__layer_stack_no_per_layer'
  assert rows == {
    'embed/embeddings': ('adam', None),  # a one-hot matmul: a lookup
    # Haiku names `Linear(32)` first: it is built before its argument.
    f'{stack}/linear/w': ('muon', '3x(64x32)'),
    f'{stack}/linear/b': ('adam', None),
    f'{stack}/linear_1/w': ('muon', '3x(32x64)'),
    f'{stack}/linear_1/b': ('adam', None),
    'out/w': ('adam', None),  # the head
    'out/b': ('adam', None),
  }
  assert 'one-hot' in routing.reasons['embed']['embeddings']
  # Names alone cannot know the stack's layout: a warning says so.
  with pytest.warns(UserWarning, match='guessed from their shapes'):
    named = muon_optax.route(params)
  assert named.labels[f'{stack}/linear']['b'] == 'adam'  # `b` beside a `w`


# -- keras 3 with the JAX backend -------------------------------------------


def _keras():
  if os.environ.setdefault('KERAS_BACKEND', 'jax') != 'jax':
    pytest.skip('keras runs another backend here')
  keras = pytest.importorskip('keras')
  if keras.backend.backend() != 'jax':
    pytest.skip('keras was loaded with another backend')
  return keras


def _keras_routing(model, x, **kwargs):
  """The README's keras line: leaf paths from the variables' names."""
  names = [v.path for v in model.trainable_variables]
  values = [v.value for v in model.trainable_variables]
  params = dict(zip(names, values, strict=True))
  stats = [v.value for v in model.non_trainable_variables]
  return muon_optax.trace_routing(
    lambda p, x: model.stateless_call(
      [p[n] for n in names], stats, x, training=True
    ),
    params,
    x,
    **kwargs,
  )


def test_keras_convnet_stateless_call_training():
  keras = _keras()
  keras.utils.set_random_seed(0)
  layers = keras.layers
  inputs = keras.Input((16, 16, 3))
  h = layers.Conv2D(8, 3, padding='same', use_bias=False, name='c1')(inputs)
  h = layers.ReLU()(layers.BatchNormalization(name='bn1')(h))
  h = layers.Conv2D(16, 3, padding='same', name='c2')(h)
  h = layers.ReLU()(layers.BatchNormalization(name='bn2')(h))
  h = layers.DepthwiseConv2D(3, padding='same', name='dw')(h)
  h = layers.GlobalAveragePooling2D()(h)
  model = keras.Model(inputs, layers.Dense(10, name='logits')(h))
  rows = _rows(_keras_routing(model, X))
  assert rows == {
    'c1/kernel': ('muon', '27x8'),
    'bn1/gamma': ('adam', None),
    'bn1/beta': ('adam', None),
    'c2/kernel': ('muon', '72x16'),
    'c2/bias': ('adam', None),
    'bn2/gamma': ('adam', None),
    'bn2/beta': ('adam', None),
    'dw/kernel': ('adam', None),  # depthwise: one input channel a group
    'dw/bias': ('adam', None),
    'logits/kernel': ('adam', None),  # the head
    'logits/bias': ('adam', None),
  }


def test_keras_transformer_returning_hidden_states():
  keras = _keras()
  keras.utils.set_random_seed(0)
  layers = keras.layers
  tokens = keras.Input((8,), dtype='int32')
  e = layers.Embedding(50, 32, name='embed')(tokens)
  a = layers.MultiHeadAttention(4, 8, name='attn')(e, e)
  h1 = layers.LayerNormalization(name='ln1')(e + a)
  up = layers.Dense(64, activation='gelu', name='up')(h1)
  h2 = layers.LayerNormalization(name='ln2')(
    h1 + layers.Dense(32, name='down')(up)
  )
  model = keras.Model(tokens, [layers.Dense(50, name='logits')(h2), h1, h2])
  routing = _keras_routing(model, TOKENS)
  rows = _rows(routing)
  muon = {p: m for p, (label, m) in rows.items() if label == 'muon'}
  assert muon == {
    'attn/query/kernel': '32x32',
    'attn/key/kernel': '32x32',
    'attn/value/kernel': '32x32',
    'attn/attention_output/kernel': '32x32',
    'up/kernel': '32x64',
    'down/kernel': '64x32',
  }
  assert rows['logits/kernel'] == ('adam', None)  # the head
  assert rows['embed/embeddings'] == ('adam', None)
  q, k = routing.attention['attn']
  assert {q, k} == {'attn/query/kernel', 'attn/key/kernel'}


# -- penzai -----------------------------------------------------------------


def test_penzai_llamalike_named_arrays():
  pz_models = pytest.importorskip('penzai.models.transformer.variants')
  from penzai import pz  # pylint: disable=g-import-not-at-top

  config = pz_models.llamalike_common.LlamalikeTransformerConfig(
    num_kv_heads=2, query_head_multiplier=2, embedding_dim=32,
    projection_dim=8, mlp_hidden_dim=64, num_decoder_blocks=2,
    vocab_size=50, mlp_variant='swiglu', tie_embedder_and_logits=False,
  )  # fmt: skip
  model = pz_models.llamalike_common.build_llamalike_transformer(
    config, init_base_rng=jax.random.key(0)
  )
  unbound, frozen = pz.unbind_params(model, freeze=True)
  params = {p.label: p.value for p in frozen}

  def forward(p, tokens):
    values = [pz.ParameterValue(value=v, label=k) for k, v in p.items()]
    return pz.bind_variables(unbound, values)(tokens)

  tokens = pz.nx.wrap(jnp.zeros((2, 8), jnp.int32)).tag('batch', 'seq')
  rows = _rows(muon_optax.trace_routing(forward, params, tokens))
  for block in ('block_0', 'block_1'):
    attn, mlp = f'transformer/{block}/attention', f'transformer/{block}/mlp'
    assert rows[f'{attn}/query.weights'] == ('muon', '32x32')  # 2x2 heads
    assert rows[f'{attn}/key.weights'] == ('muon', '32x16')
    assert rows[f'{attn}/value.weights'] == ('muon', '32x16')
    assert rows[f'{attn}/output.weights'] == ('muon', '32x32')
    assert rows[f'{mlp}/gating_linear.weights'] == ('muon', '32x64')
    assert rows[f'{mlp}/value_linear.weights'] == ('muon', '32x64')
    assert rows[f'{mlp}/out_linear.weights'] == ('muon', '64x32')
  assert rows['transformer/embedder.embeddings'] == ('adam', None)
  assert rows['transformer/lm_head.weights'] == ('adam', None)
  assert sum(1 for label, _ in rows.values() if label == 'muon') == 14
  # Names alone cannot read the einsum layouts: a warning names them.
  with pytest.warns(UserWarning, match='guessed.*query.weights'):
    muon_optax.route(params)


# -- Plain JAX: einsum kernels, a residual stream ---------------------------


def _gemma_like():
  """gemma's einsum kernels: q (heads, d, head_dim), kv (2, kv, d, hd)."""
  d, heads, hd, ff = 32, 4, 8, 64
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {
    'embedder': {'input_embedding': s(50, d)},
    'layer_0': {
      'attn': {
        'q_einsum': {'w': s(heads, d, hd)},
        'kv_einsum': {'w': s(2, heads, d, hd)},
        'attn_vec_einsum': {'w': s(heads, hd, d)},
      },
      'mlp': {'gating_einsum': s(2, ff, d), 'linear': s(ff, d)},
    },
  }

  def forward(p, tokens):
    x = p['embedder']['input_embedding'][tokens]
    a = p['layer_0']['attn']
    q = jnp.einsum('btd,hdk->bthk', x, a['q_einsum']['w'])
    k, v = jnp.einsum('btd,chdk->cbthk', x, a['kv_einsum']['w'])
    w = jax.nn.softmax(jnp.einsum('bthk,bshk->bhts', q, k), -1)
    o = jnp.einsum('bhts,bshk->bthk', w, v)
    x = x + jnp.einsum('bthk,hkd->btd', o, a['attn_vec_einsum']['w'])
    m = p['layer_0']['mlp']
    gate, up = jnp.einsum('btd,cfd->cbtf', x, m['gating_einsum'])
    x = x + jnp.einsum('btf,fd->btd', jax.nn.gelu(gate) * up, m['linear'])
    return x @ p['embedder']['input_embedding'].T  # tied

  return params, forward


def test_einsum_kernels_traced_and_warned_by_names():
  params, forward = _gemma_like()
  rows = _rows(muon_optax.trace_routing(forward, params, TOKENS))
  attn, mlp = 'layer_0/attn', 'layer_0/mlp'
  assert rows == {
    'embedder/input_embedding': ('adam', None),  # gathered, and tied
    f'{attn}/q_einsum/w': ('muon', '32x32'),  # d x heads·head_dim
    # k and v are one matmul (its free axes 2, heads, head_dim): fused, as
    # a fused QKV Dense would be.
    f'{attn}/kv_einsum/w': ('muon', '32x64'),
    f'{attn}/attn_vec_einsum/w': ('muon', '32x32'),
    f'{mlp}/gating_einsum': ('muon', '32x128'),  # gate and up, fused
    f'{mlp}/linear': ('muon', '64x32'),
  }
  with pytest.warns(UserWarning, match='guessed.*q_einsum'):
    muon_optax.route(params)


def test_a_returned_residual_stream_is_warned_about():
  params, _ = _gemma_like()

  def backbone(p, tokens):  # returns its residual stream, no head
    x = p['embedder']['input_embedding'][tokens]
    a, m = p['layer_0']['attn'], p['layer_0']['mlp']
    q = jnp.einsum('btd,hdk->bthk', x, a['q_einsum']['w'])
    x = x + jnp.einsum('bthk,hkd->btd', q, a['attn_vec_einsum']['w'])
    gate, up = jnp.einsum('btd,cfd->cbtf', x, m['gating_einsum'])
    return x + jnp.einsum('btf,fd->btd', jax.nn.gelu(gate) * up, m['linear'])

  params = {
    'embedder': params['embedder'],
    'layer_0': {
      'attn': {k: params['layer_0']['attn'][k] for k in ('q_einsum',
                                                         'attn_vec_einsum')},
      'mlp': params['layer_0']['mlp'],
    },
  }  # fmt: skip
  with pytest.warns(UserWarning, match='residual stream') as caught:
    routing = muon_optax.trace_routing(backbone, params, TOKENS)
  assert "'layer_0/mlp/linear'" in str(caught[0].message)
  # The stream's last writer feeds no later layer: a head, with a warning.
  assert routing.labels['layer_0']['mlp']['linear'] == 'adam'
  assert routing.labels['layer_0']['attn']['attn_vec_einsum']['w'] == 'muon'
  assert 'warning: Output 0' in muon_optax.describe(routing)
  kept = muon_optax.route(routing, head='muon')
  assert kept.labels['layer_0']['mlp']['linear'] == 'muon'
