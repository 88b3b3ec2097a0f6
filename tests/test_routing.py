"""Default routing on Flax NNX and Linen models, overrides and bad labels."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax


def _labels(tree):
  return {
    jax.tree_util.keystr(kp, simple=True, separator='/'): v
    for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


class ResBlock(nnx.Module):
  def __init__(self, c_in, c_out, *, rngs):
    self.conv1 = nnx.Conv(c_in, c_out, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(c_out, rngs=rngs)
    self.conv2 = nnx.Conv(c_out, c_out, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c_out, rngs=rngs)
    self.proj = nnx.Conv(c_in, c_out, (1, 1), use_bias=False, rngs=rngs)
    self.dw = nnx.Conv(
      c_out, c_out, (3, 3), feature_group_count=c_out, rngs=rngs
    )

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.dw(self.bn2(self.conv2(y)))
    return nnx.relu(y + self.proj(x))


class ResNet(nnx.Module):
  def __init__(self, *, rngs):
    self.stem = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.block1 = ResBlock(16, 32, rngs=rngs)
    self.block2 = ResBlock(32, 32, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = self.block2(self.block1(nnx.relu(self.stem(x))))
    return self.head(x.mean(axis=(1, 2)))


class Block(nnx.Module):
  def __init__(self, d, *, rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(4, d, decode=False, rngs=rngs)
    self.ln2 = nnx.RMSNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
  def __init__(self, *, rngs, vocab=50, d=32):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, rngs=rngs) for _ in range(2)])
    self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.lm_head(x)


def test_nnx_resnet_routing():
  labels = _labels(muon_optax.route(ResNet(rngs=nnx.Rngs(0))).labels)
  muon = sorted(k for k, v in labels.items() if v == 'muon')
  assert muon == [
    'block1/conv1/kernel',
    'block1/conv2/kernel',
    'block1/proj/kernel',
    'block2/conv1/kernel',
    'block2/conv2/kernel',
    'block2/proj/kernel',
    'stem/kernel',
  ]
  # Depthwise convs, BatchNorm, biases and the head go to Adam.
  assert labels['block1/dw/kernel'] == 'adam'
  assert labels['head/kernel'] == 'adam'
  assert labels['block1/bn1/scale'] == 'adam'


def test_nnx_transformer_routing_and_views():
  model = GPT(rngs=nnx.Rngs(0))
  labels = _labels(muon_optax.route(model).labels)
  muon = {k for k, v in labels.items() if v == 'muon'}
  for i in range(2):
    for name in ('query', 'key', 'value', 'out'):
      assert f'blocks/{i}/attn/{name}/kernel' in muon
    assert f'blocks/{i}/up/kernel' in muon and f'blocks/{i}/down/kernel' in muon
  assert len(muon) == 12
  assert labels['embed/embedding'] == 'adam'
  assert labels['lm_head/kernel'] == 'adam'
  assert labels['blocks/0/attn/query/bias'] == 'adam'  # (heads, head_dim)
  views = muon_optax.route(model).by_path()
  q = views['blocks/0/attn/query/kernel'][1].resolve((32, 4, 8))
  o = views['blocks/0/attn/out/kernel'][1].resolve((4, 8, 32))
  assert q.matrix_shape == (32, 32) and o.matrix_shape == (32, 32)


def test_nnx_stacked_layers_are_batches():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(16, 48, rngs=nnx.Rngs(key))

  stacked = make(jax.random.split(jax.random.key(0), 6))
  rules = muon_optax.route(stacked).by_path()
  label, view, _ = rules['kernel']
  resolved = view.resolve(stacked.kernel.shape)
  assert label == 'muon'
  assert resolved.num_matrices == 6 and resolved.matrix_shape == (16, 48)


def test_nnx_einsum_and_transposed_conv_views():
  rngs = nnx.Rngs(0)

  class M(nnx.Module):
    def __init__(self):
      self.qkv = nnx.Einsum('btd,dhk->bthk', (32, 4, 8), rngs=rngs)
      self.up = nnx.ConvTranspose(8, 16, (3, 3), rngs=rngs)

  rules = muon_optax.route(M()).by_path()
  assert rules['qkv/kernel'][1].resolve((32, 4, 8)).matrix_shape == (32, 32)
  assert rules['up/kernel'][1].resolve((3, 3, 8, 16)).matrix_shape == (72, 16)


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.Conv(32, (3, 3), feature_group_count=32)(x)
    return nn.Dense(10, name='head')(x.mean(axis=(1, 2)))


class LinenLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(50, 32)(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4)(x)
    x = x + nn.Dense(32)(nn.gelu(nn.Dense(128)(x)))
    return nn.Dense(50, name='lm_head')(x)


def test_linen_cnn_routing():
  params = LinenCNN().init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))['params']
  labels = _labels(muon_optax.route(params).labels)
  assert labels['Conv_0/kernel'] == 'muon'
  assert labels['Conv_1/kernel'] == 'muon'
  # A depthwise Linen kernel is (3, 3, 1, 32): a 9 x 32 matrix is not
  # degenerate, so a plain tree cannot tell it from a thin conv; say so.
  labels = _labels(
    muon_optax.route(params, overrides={'Conv_2': 'adam'}).labels
  )
  assert labels['Conv_2/kernel'] == 'adam'
  assert labels['head/kernel'] == 'adam'
  assert labels['Conv_0/bias'] == 'adam'


def test_linen_transformer_routing_and_views():
  params = LinenLM().init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))[
    'params'
  ]
  labels = _labels(muon_optax.route(params).labels)
  assert labels['Embed_0/embedding'] == 'adam'
  assert labels['lm_head/kernel'] == 'adam'
  attn = 'MultiHeadDotProductAttention_0'
  for name in ('query', 'key', 'value', 'out'):
    assert labels[f'{attn}/{name}/kernel'] == 'muon'
    assert labels[f'{attn}/{name}/bias'] == 'adam'
  rules = muon_optax.route(params).by_path()
  assert rules[f'{attn}/query/kernel'][1].resolve((32, 4, 8)).matrix_shape == (
    32,
    32,
  )
  assert rules[f'{attn}/out/kernel'][1].resolve((4, 8, 32)).matrix_shape == (
    32,
    32,
  )


def test_degenerate_matrices_go_to_adam():
  params = {
    'thin': jnp.ones((1, 64)),
    'narrow': jnp.ones((512, 3)),
    'aspect': jnp.ones((8, 2048)),
    'ok': jnp.ones((8, 1024)),
  }
  labels = muon_optax.route(params).labels
  assert labels == {
    'thin': 'adam',
    'narrow': 'adam',
    'aspect': 'adam',
    'ok': 'muon',
  }


def test_stacked_plain_tree():
  params = {'layers': {'kernel': jnp.ones((6, 16, 48))}}
  with pytest.warns(UserWarning, match="guessed.*'layers/kernel'"):
    default = muon_optax.route(params).views['layers']['kernel']
  assert default.resolve((6, 16, 48)).matrix_shape == (96, 48)  # conv1d
  views = muon_optax.route(params, stacked=['layers']).views
  resolved = views['layers']['kernel'].resolve((6, 16, 48))
  assert resolved.num_matrices == 6 and resolved.matrix_shape == (16, 48)


def test_overrides_win():
  params = {
    'stem': {'kernel': jnp.ones((3, 3, 3, 16))},
    'fc': {'kernel': jnp.ones((16, 10))},
  }
  labels = muon_optax.route(
    params, overrides={'stem': 'adam', 'fc/*': 'muon', 'fc': 'adam'}
  ).labels
  # First match wins: 'fc/*' before 'fc'.
  assert labels == {'stem': {'kernel': 'adam'}, 'fc': {'kernel': 'muon'}}
  labels = muon_optax.route(params, overrides={'fc/kernel': 'adam'}).labels
  assert labels['fc']['kernel'] == 'adam' and labels['stem']['kernel'] == 'muon'


def test_an_override_that_matches_nothing_is_an_error():
  params = {'stem': {'kernel': jnp.ones((3, 3, 3, 16))}}
  with pytest.raises(ValueError, match=r"\['stemm'\] match no parameter"):
    muon_optax.route(params, overrides={'stemm': 'adam'})
  with pytest.raises(ValueError, match="'stemm'"):
    muon_optax.route(
      params, view_overrides={'stemm': muon_optax.MatrixView.conv(2)}
    )


def _nnx_train(model, tx, x, y, steps):
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return [float(step(model, optimizer, x, y)) for _ in range(steps)]


@pytest.mark.slow
def test_nnx_optimizer_end_to_end_with_every_label_form():
  """The module, its label tree and the default names rules route this
  model alike: the same losses, step by step, and they fall."""
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
  y = jnp.arange(16) % 10
  curves = {}
  for how in ('module', 'label_tree', 'default'):
    model = ResNet(rngs=nnx.Rngs(0))
    labels = {
      'module': model,
      'label_tree': muon_optax.route(model).labels,
      'default': None,
    }[how]
    tx = muon_optax.muon(3e-3, param_labels=labels, weight_decay=0.01)
    curves[how] = _nnx_train(model, tx, x, y, 8)
  assert curves['module'][-1] < 0.8 * curves['module'][0]
  np.testing.assert_allclose(curves['label_tree'], curves['module'], rtol=1e-6)
  np.testing.assert_allclose(curves['default'], curves['module'], rtol=1e-6)


@pytest.mark.slow
def test_nnx_transformer_end_to_end():
  model = GPT(rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 50)

  class LM(nnx.Module):
    def __init__(self, gpt):
      self.gpt = gpt

    def __call__(self, t):
      return self.gpt(t)[:, :-1].reshape(-1, 50)

  lm = LM(model)
  tx = muon_optax.muon(1e-2, param_labels=lm)
  losses = _nnx_train(lm, tx, tokens, tokens[:, 1:].reshape(-1), 8)
  assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
def test_linen_train_state_end_to_end():
  from flax.training import train_state

  model = LinenCNN()
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
  y = jnp.arange(16) % 10
  variables = model.init(jax.random.key(0), x)
  tx = muon_optax.muon(
    2e-2,
    param_labels=muon_optax.route(
      variables['params'], overrides={'Conv_2': 'adam'}
    ).labels,
  )
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=variables['params'], tx=tx
  )

  @jax.jit
  def step(state):
    def loss_fn(p):
      logits = state.apply_fn(
        {'params': p, 'batch_stats': variables['batch_stats']}, x
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, g = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=g), loss

  losses = []
  for _ in range(12):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]


class TestErrors:
  def test_unknown_label(self):
    params = {'w': jnp.ones((4, 4)), 'b': jnp.ones(4)}
    tx = muon_optax.muon(0.1, param_labels={'w': 'muon', 'b': 'sgd'})
    with pytest.raises(ValueError, match="'b'.*'sgd'"):
      tx.init(params)

  def test_label_tree_missing_a_param(self):
    params = {'w': jnp.ones((4, 4)), 'b': jnp.ones(4)}
    tx = muon_optax.muon(0.1, param_labels={'w': 'muon'})
    with pytest.raises(ValueError, match="no label for parameter 'b'"):
      tx.init(params)

  def test_label_tree_with_extra_entries(self):
    params = {'w': jnp.ones((4, 4))}
    tx = muon_optax.muon(0.1, param_labels={'w': 'muon', 'v': 'adam'})
    with pytest.raises(ValueError, match=r"\['v'\] name no parameter"):
      tx.init(params)

  def test_muon_label_on_a_vector(self):
    params = {'layer': {'bias': jnp.ones(4)}}
    tx = muon_optax.muon(0.1, param_labels={'layer': {'bias': 'muon'}})
    with pytest.raises(ValueError, match="'layer/bias' of shape \\(4,\\)"):
      tx.init(params)

  def test_bad_view_override(self):
    params = {'w': jnp.ones((4, 4))}
    tx = muon_optax.scale_by_muon(
      matrix_views={'w': muon_optax.MatrixView((0,), (0,))}
    )
    with pytest.raises(ValueError, match="'w'"):
      tx.init(params)
    tx = muon_optax.scale_by_muon(matrix_views={'w': 'dense'})
    with pytest.raises(TypeError, match="'w'"):
      tx.init(params)

  def test_integer_leaf_labelled_muon(self):
    tx = muon_optax.scale_by_muon()
    with pytest.raises(TypeError, match="'step'"):
      tx.init({'step': jnp.ones((4, 4), jnp.int32)})

  def test_bad_override_label(self):
    with pytest.raises(ValueError, match="overrides\\['fc'\\]"):
      muon_optax.route({'fc': jnp.ones((4, 4))}, overrides={'fc': 'sgd'})


def test_optax_dimension_numbers_are_accepted():
  params = {
    'qkv': jnp.asarray(
      np.random.default_rng(0).standard_normal((32, 3, 64)), jnp.float32
    )
  }
  dn = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=2)
  tx = muon_optax.scale_by_muon(matrix_views={'qkv': dn})
  u, _ = tx.update(params, tx.init(params))
  for i in range(3):  # axis 1 is a batch: three (32, 64) matrices
    want = muon_optax.orthogonalize(params['qkv'][:, i])
    np.testing.assert_allclose(u['qkv'][:, i], want, atol=1e-5)


def test_describe_says_when_the_rules_had_to_guess():
  params = {
    'Dense_0': {'kernel': jnp.zeros((8, 16))},
    'Dense_1': {'kernel': jnp.zeros((16, 10))},
    'x': jnp.zeros((3, 8, 8)),
  }
  with pytest.warns(UserWarning, match=r"guessed from their shapes \('x'\)"):
    text = muon_optax.describe(params)
  assert 'no output head was found by name' in text
  assert 'guessed conv layout' in text
  assert 'warning: The layouts of 1 leaves with three or more axes' in text
  named = {
    'Conv_0': {'kernel': jnp.zeros((3, 3, 8, 16))},
    'head': params['Dense_1'],
  }
  assert 'note:' not in muon_optax.describe(named)


def test_pytorch_style_dotted_keys():
  params = {
    'conv1.weight': jnp.zeros((64, 3, 7, 7)),
    'layer1.0.conv1.weight': jnp.zeros((64, 64, 3, 3)),
    'fc.weight': jnp.zeros((10, 512)),
    'lm_head.weight': jnp.zeros((100, 64)),
    'tok_emb.weight': jnp.zeros((100, 64)),
  }
  labels = muon_optax.route(params).labels
  assert labels == {
    'conv1.weight': 'muon',
    'layer1.0.conv1.weight': 'muon',
    'fc.weight': 'adam',
    'lm_head.weight': 'adam',
    'tok_emb.weight': 'adam',
  }
  views = muon_optax.route(params).views
  shape = views['layer1.0.conv1.weight'].resolve((64, 64, 3, 3)).matrix_shape
  assert shape == (576, 64)  # (in·kh·kw, out) from the (out, in, kh, kw) layout
  relabelled = muon_optax.route(params, overrides={'lm_head': 'muon'}).labels
  assert relabelled['lm_head.weight'] == 'muon'


def test_describe_a_routing_alone():
  params = {'w1': jnp.zeros((8, 16)), 'w2': jnp.zeros((16, 10))}
  x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  routing = muon_optax.trace_routing(
    lambda p, x: jax.nn.relu(x @ p['w1']) @ p['w2'], params, x
  )
  text = muon_optax.describe(routing)
  assert 'w1    (8, 16)   muon   8x16' in text
  assert text == muon_optax.describe(params, routing)
