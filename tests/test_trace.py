"""trace_routing: routing read from the jaxpr of real model definitions.

Every expected label, view and matrix shape below was worked out by hand
from the model definition; the update check compares Muon's first update
with a float64 NumPy Newton-Schulz step on the same matrices.
"""

import functools
import importlib.util

from flax import nnx
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax
from muon_optax import Routing
from muon_optax import _paths
from muon_optax import trace_routing
from muon_optax._views import MatrixView

DENSE = MatrixView((-2,), (-1,))  # (in, out), leading axes stacked
TORCH = MatrixView((-1,), (-2,))  # (out, in)
HWIO = MatrixView((-4, -3, -2), (-1,))
OIHW = MatrixView((-3, -2, -1), (-4,))
QKV = MatrixView((-3,), (-2, -1))  # (d, heads, head_dim)
OUT = MatrixView((-3, -2), (-1,))  # (heads, head_dim, d)
EW = ('adam', None, None, 'elementwise only')
STACKED = 'dot_general operand, contracts axis 1'


def _muon(view, matrix, why='dot_general operand'):
  return ('muon', view, matrix, why)


def _head(view, matrix):
  return ('adam', view, matrix, 'output head; reaches the output')


def _check(routing, params, expected):
  """Labels, views, matrix shapes and reasons, leaf by leaf."""
  assert isinstance(routing, Routing)
  shapes = {p: np.shape(x) for p, x in _paths.leaves_with_paths(params)}
  got = routing.by_path()
  assert set(got) == set(expected) == set(shapes)
  for path, (label, view, matrix, why) in expected.items():
    g_label, g_view, g_why = got[path]
    assert (g_label, g_view) == (label, view), (path, got[path])
    if view is not None:
      assert g_view.resolve(shapes[path]).describe() == matrix, path
    assert g_why.startswith(why), (path, g_why)


def _real(shapes, seed=0):
  """NumPy-random arrays for the ShapeDtypeStruct leaves of a tree.

  NumPy, not jax.random: each new shape would compile a jax.random kernel.
  """
  rng = np.random.default_rng(seed)

  def fill(x):
    if not isinstance(x, (jax.ShapeDtypeStruct, jax.Array)):
      return x
    return jnp.asarray(rng.standard_normal(x.shape), x.dtype)

  return jax.tree.map(fill, shapes)


def _ns_reference(g, view):
  """One Newton-Schulz step (a, b, c) = (0, 1, 0) per matrix, in float64.

  X <- X X^T X: unlike a convergent step (nearly linear in X on a first step
  from a Frobenius-normalized X), it is far from the same map on a wrong view
  (cosine about 0.9 between views in these models), so a view that is not
  the one scale_by_muon used fails the comparison.
  """
  resolved = view.resolve(g.shape)
  x = np.asarray(resolved.to_matrices(jnp.asarray(g)), np.float64)
  x = x / np.linalg.norm(x, axis=(1, 2), keepdims=True)
  y = x @ np.swapaxes(x, 1, 2) @ x
  return np.asarray(resolved.from_matrices(jnp.asarray(y)), np.float64)


def _check_update(routings):
  """All routings drive one optax.partition + scale_by_muon update.

  One jitted update over the models side by side (one compile, not one per
  model); each Muon leaf's update is compared with a float64 Newton-Schulz
  step on the matrices its view reads.
  """
  params = {name: p for name, (_, p) in routings.items()}
  labels = {name: r.labels for name, (r, _) in routings.items()}
  # Views by path: an Equinox module is callable, and optax and muon_optax
  # would call a tree of views or labels that is one.
  table = {
    f'{name}/{path}': entry
    for name, (r, _) in routings.items()
    for path, entry in r.by_path().items()
  }
  views = {p: v for p, (label, v, _) in table.items() if label == 'muon'}
  tx = optax.partition(
    {
      'muon': muon_optax.scale_by_muon(
        matrix_views=views, ns_coeffs=(0.0, 1.0, 0.0), ns_steps=1
      ),
      'adam': optax.scale_by_adam(),
    },
    lambda _: labels,
  )
  grads = _real(params, seed=1)
  step = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
  # XLA's backend optimizations would double this test's compile time.
  step = step.lower(grads, params).compile(
    compiler_options={'xla_backend_optimization_level': 0}
  )
  updates = step(grads, params)
  got = dict(_paths.leaves_with_paths(updates))
  checked = 0
  for path, g in _paths.leaves_with_paths(grads):
    u = np.asarray(got[path], np.float64)
    assert np.all(np.isfinite(u)), path
    if path in views:
      # Any shape scaling is one factor per leaf: compare directions.
      ref = _ns_reference(np.asarray(g), views[path])
      cos = np.vdot(u, ref) / (np.linalg.norm(u) * np.linalg.norm(ref))
      assert cos > 1 - 1e-5, (path, cos)
      checked += 1
  assert checked == len(views) > 0


# -- Flax Linen ResNet with an auto-named Dense_0 head ---------------------


class ResBlock(nn.Module):
  ch: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.ch, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(nn.BatchNorm(use_running_average=True)(y))
    y = nn.Conv(self.ch, (3, 3), use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=True)(y)
    if x.shape[-1] != self.ch or self.strides != 1:
      x = nn.Conv(self.ch, (1, 1), self.strides, use_bias=False, name='proj')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    x = ResBlock(8)(x)
    x = ResBlock(16, 2)(x)
    return nn.Dense(10)(x.mean((1, 2)))


@functools.cache
def linen_resnet():
  model = ResNet()
  x = jnp.zeros((2, 16, 16, 3))
  variables = _real(jax.eval_shape(model.init, jax.random.key(0), x))
  params, stats = variables['params'], variables['batch_stats']
  routing = trace_routing(
    lambda p, x: model.apply({'params': p, 'batch_stats': stats}, x),
    params,
    x,
  )
  bn = {f'{p}/{n}': EW for n in ('scale', 'bias') for p in (
    'BatchNorm_0', 'ResBlock_0/BatchNorm_0', 'ResBlock_0/BatchNorm_1',
    'ResBlock_1/BatchNorm_0', 'ResBlock_1/BatchNorm_1')}  # fmt: skip
  expected = {
    'Conv_0/kernel': _muon(HWIO, '27x8', 'conv kernel (HWIO) 3x3x3 -> 27x8'),
    'ResBlock_0/Conv_0/kernel': _muon(HWIO, '72x8', 'conv kernel (HWIO)'),
    'ResBlock_0/Conv_1/kernel': _muon(HWIO, '72x8', 'conv kernel (HWIO)'),
    'ResBlock_1/Conv_0/kernel': _muon(HWIO, '72x16', 'conv kernel (HWIO)'),
    'ResBlock_1/Conv_1/kernel': _muon(HWIO, '144x16', 'conv kernel'),
    'ResBlock_1/proj/kernel': _muon(HWIO, '8x16', 'conv kernel (HWIO) 1x1x8'),
    'Dense_0/kernel': _head(DENSE, '16x10'),
    'Dense_0/bias': EW,
    **bn,
  }
  return routing, params, expected


def test_linen_resnet():
  _check(*linen_resnet())


# -- Flax Linen nn.scan Transformer ----------------------------------------


class TBlock(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads)(h, h)
    h = nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(h)), None


class ScanLM(nn.Module):
  vocab: int = 64
  d: int = 32
  layers: int = 3

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d)(tokens)
    shape = (tokens.shape[1], self.d)
    x = x + self.param('pos_embedding', nn.initializers.normal(0.02), shape)
    stack = nn.scan(
      TBlock,
      variable_axes={'params': 0},
      split_rngs={'params': True},
      length=self.layers,
    )
    x, _ = stack(4, name='blocks')(x, None)
    return nn.Dense(self.vocab, name='head')(nn.LayerNorm()(x))


@functools.cache
def linen_scan_transformer():
  model = ScanLM()
  tokens = jnp.zeros((2, 8), jnp.int32)
  params = _real(jax.eval_shape(model.init, jax.random.key(0), tokens))
  params = params['params']
  routing = trace_routing(
    lambda p, t: model.apply({'params': p}, t), params, tokens
  )
  attn = 'blocks/MultiHeadDotProductAttention_0'
  expected = {
    'Embed_0/embedding': ('adam', None, None, 'gather (embedding)'),
    'pos_embedding': EW,
    # Stacked (3, 32, 4, 8): 3 matrices 32 x (4 * 8).
    f'{attn}/query/kernel': _muon(QKV, '3x(32x32)', STACKED),
    f'{attn}/key/kernel': _muon(QKV, '3x(32x32)', STACKED),
    f'{attn}/value/kernel': _muon(QKV, '3x(32x32)', STACKED),
    # Stacked (3, 4, 8, 32): 3 matrices (4 * 8) x 32.
    f'{attn}/out/kernel': _muon(
      OUT, '3x(32x32)', 'dot_general operand, contracts axes 1, 2'
    ),  # fmt: skip
    'blocks/Dense_0/kernel': _muon(DENSE, '3x(32x128)', STACKED),
    'blocks/Dense_1/kernel': _muon(DENSE, '3x(128x32)', STACKED),
    'head/kernel': _head(DENSE, '32x64'),
  }
  for path, _ in _paths.leaves_with_paths(params):
    if path.endswith(('bias', 'scale')):
      expected[path] = EW
  return routing, params, expected


def test_linen_scan_transformer():
  _check(*linen_scan_transformer())


# -- Flax NNX ViT ----------------------------------------------------------


class ViT(nnx.Module):
  def __init__(self, *, rngs, d=32, patch=4, img=16, classes=10):
    self.patch = nnx.Conv(3, d, (patch, patch), strides=patch, rngs=rngs)
    n = (img // patch) ** 2
    self.cls = nnx.Param(jnp.zeros((1, 1, d)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n + 1, d)))
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(4, d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, classes, rngs=rngs)

  def __call__(self, x):
    x = self.patch(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos[...]
    x = x + self.attn(self.ln1(x))
    x = x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))
    return self.head(self.norm(x)[:, 0])


@functools.cache
def nnx_vit():
  model = nnx.eval_shape(lambda: ViT(rngs=nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  state = _real(state)
  x = jnp.zeros((2, 16, 16, 3))
  routing = trace_routing(
    lambda s, x: nnx.merge(graphdef, s, rest)(x), state, x
  )
  expected = {
    'patch/kernel': _muon(HWIO, '48x32', 'conv kernel (HWIO) 4x4x3 -> 48x32'),
    'cls': EW,
    'pos': EW,
    'attn/query/kernel': _muon(QKV, '32x32'),
    'attn/key/kernel': _muon(QKV, '32x32'),
    'attn/value/kernel': _muon(QKV, '32x32'),
    'attn/out/kernel': _muon(OUT, '32x32'),
    'fc1/kernel': _muon(DENSE, '32x64'),
    'fc2/kernel': _muon(DENSE, '64x32'),
    'head/kernel': _head(DENSE, '32x10'),
  }
  for path, _ in _paths.leaves_with_paths(state):
    if path.endswith(('bias', 'scale')):
      expected[path] = EW
  return routing, state, expected, model


def test_nnx_vit():
  routing, state, expected, model = nnx_vit()
  _check(routing, state, expected)
  # The paths are those of nnx.state(model, nnx.Param), in order.
  paths = [p for p, _ in _paths.leaves_with_paths(nnx.state(model, nnx.Param))]
  assert list(routing.by_path()) == paths


# -- Equinox CNN with attention and an embedding ---------------------------


@functools.cache
def equinox_cnn():
  eqx = pytest.importorskip('equinox')

  class EqxNet(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    embed: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear

    def __init__(self, key):
      k = jax.random.split(key, 5)
      self.conv1 = eqx.nn.Conv2d(3, 16, 3, padding=1, key=k[0])
      self.conv2 = eqx.nn.Conv2d(16, 32, 3, padding=1, key=k[1])
      self.embed = eqx.nn.Embedding(20, 32, key=k[2])
      self.attn = eqx.nn.MultiheadAttention(4, 32, key=k[3])
      self.head = eqx.nn.Linear(32, 10, key=k[4])

    def __call__(self, x, label):
      # One (3, H, W) image; the label's embedding queries its pixels.
      h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
      tokens = h.reshape(32, -1).T
      out = self.attn(self.embed(label)[None], tokens, tokens)
      return self.head(out[0])

  model = _real(eqx.filter_eval_shape(EqxNet, jax.random.key(0)))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  routing = trace_routing(
    lambda p, x, y: eqx.combine(p, static)(x, y),
    params,
    jnp.zeros((3, 8, 8)),
    jnp.array(3),
  )
  expected = {
    'conv1/weight': _muon(OIHW, '27x16', 'conv kernel (OIHW) 3x3x3 -> 27x16'),
    'conv1/bias': EW,  # (16, 1, 1)
    'conv2/weight': _muon(OIHW, '144x32', 'conv kernel (OIHW) 16x3x3'),
    'conv2/bias': EW,
    'embed/weight': ('adam', None, None, 'dynamic_slice (embedding)'),
    **{
      f'attn/{n}_proj/weight': _muon(
        TORCH, '32x32', 'dot_general operand, contracts axis 1'
      )  # fmt: skip
      for n in ('query', 'key', 'value', 'output')
    },
    'head/weight': _head(TORCH, '32x10'),
    'head/bias': EW,
  }
  return routing, params, expected


def test_equinox_cnn():
  routing, params, expected = equinox_cnn()
  _check(routing, params, expected)
  # The result trees are modules shaped like `params`.
  assert type(routing.labels) is type(params)


# -- Plain JAX: OIHW convolutions, head='muon', an unused leaf ------------


def _plain_convnet(p, x):
  dn = ('NCHW', 'OIHW', 'NCHW')
  h = lax.conv_general_dilated(x, p['c1'], (1, 1), 'SAME', dimension_numbers=dn)
  h = jax.nn.relu(h + p['b1'][None, :, None, None])
  h = lax.conv_general_dilated(h, p['c2'], (2, 2), 'SAME', dimension_numbers=dn)
  return jax.nn.relu(h).mean((2, 3)) @ p['w']


@functools.cache
def plain_oihw(head='adam'):
  params = _real({
    'c1': jax.ShapeDtypeStruct((16, 3, 3, 3), jnp.float32),
    'b1': jax.ShapeDtypeStruct((16,), jnp.float32),
    'c2': jax.ShapeDtypeStruct((32, 16, 3, 3), jnp.float32),
    'w': jax.ShapeDtypeStruct((32, 10), jnp.float32),
    'unused': jax.ShapeDtypeStruct((8, 8), jnp.float32),
  })  # fmt: skip
  x = jnp.zeros((2, 3, 8, 8))
  routing = muon_optax.route(
    trace_routing(_plain_convnet, params, x), head=head
  )
  if head == 'adam':
    w = _head(DENSE, '32x10')
  else:
    w = _muon(DENSE, '32x10', "output head, kept on Muon (head='muon')")
  expected = {
    'c1': _muon(OIHW, '27x16', 'conv kernel (OIHW) 3x3x3 -> 27x16'),
    'b1': EW,
    'c2': _muon(OIHW, '144x32', 'conv kernel (OIHW) 16x3x3 -> 144x32'),
    'w': w,
    'unused': ('adam', None, None, 'unused'),
  }
  return routing, params, expected


@pytest.mark.parametrize('head', ['adam', 'muon'])
def test_plain_oihw_convs_head_and_unused(head):
  _check(*plain_oihw(head))


# -- MoE banks: jnp.einsum and nnx.Einsum ---------------------------------


def _moe(p, x):
  h = jax.nn.gelu(jnp.einsum('btd,edf->btef', x, p['w_in']))
  y = jnp.einsum('btef,efd->bted', h, p['w_out'])
  gates = jax.nn.softmax(x @ p['router'], axis=-1)
  return jnp.einsum('bted,bte->btd', y, gates) @ p['head']


class NnxMoE(nnx.Module):
  def __init__(self, e, d, f, *, rngs):
    self.w_in = nnx.Einsum('btd,edf->btef', (e, d, f), rngs=rngs)
    self.w_out = nnx.Einsum('btef,efd->bted', (e, f, d), rngs=rngs)
    self.router = nnx.Linear(d, e, rngs=rngs)
    self.head = nnx.Linear(d, 10, rngs=rngs)

  def __call__(self, x):
    y = self.w_out(nnx.gelu(self.w_in(x)))
    gates = nnx.softmax(self.router(x), axis=-1)
    return self.head(jnp.einsum('bted,bte->btd', y, gates))


def _moe_expected(suffix):
  return {
    # w_in's expert axis is a free axis of its own einsum; its outputs meet
    # w_out's expert (batch) axis, so it is a bank of 4 matrices too.
    f'w_in{suffix}': _muon(
      DENSE,
      '4x(16x64)',
      'dot_general operand, '
      'contracts axis 1 -> 4x(16x64) (expert axis 0 '
      'as batch)',
    ),  # fmt: skip
    f'w_out{suffix}': _muon(DENSE, '4x(64x16)', STACKED),
    f'router{suffix}': _muon(DENSE, '16x4'),
    f'head{suffix}': _head(DENSE, '16x10'),
  }


@functools.cache
def moe_einsum():
  params = _real({
    'w_in': jax.ShapeDtypeStruct((4, 16, 64), jnp.float32),
    'w_out': jax.ShapeDtypeStruct((4, 64, 16), jnp.float32),
    'router': jax.ShapeDtypeStruct((16, 4), jnp.float32),
    'head': jax.ShapeDtypeStruct((16, 10), jnp.float32),
  })  # fmt: skip
  routing = trace_routing(_moe, params, jnp.zeros((2, 5, 16)))
  return routing, params, _moe_expected('')


@functools.cache
def moe_nnx_einsum():
  model = nnx.eval_shape(lambda: NnxMoE(4, 16, 64, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model, nnx.Param)
  state = _real(state)
  routing = trace_routing(
    lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.zeros((2, 5, 16))
  )
  expected = _moe_expected('/kernel')
  expected.update({'head/bias': EW, 'router/bias': EW})
  return routing, state, expected


def test_moe_einsum_bank():
  _check(*moe_einsum())


def test_moe_nnx_einsum():
  _check(*moe_nnx_einsum())


# -- ConvNeXt: depthwise convs to Adam --------------------------------------


class ConvNeXtBlock(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(
      self.dim, (7, 7), feature_group_count=self.dim, padding=3, name='dwconv'
    )(x)
    h = nn.Dense(4 * self.dim, name='pwconv1')(nn.LayerNorm()(h))
    h = nn.Dense(self.dim, name='pwconv2')(nn.gelu(h))
    gamma = self.param('gamma', nn.initializers.constant(1e-6), (self.dim,))
    return x + gamma * h


class ConvNeXt(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = ConvNeXtBlock(16)(nn.Conv(16, (4, 4), strides=4, name='stem')(x))
    return nn.Dense(10, name='head')(x.mean((1, 2)))


@functools.cache
def convnext():
  model = ConvNeXt()
  x = jnp.zeros((2, 16, 16, 3))
  params = _real(jax.eval_shape(model.init, jax.random.key(0), x))['params']
  routing = trace_routing(lambda p, x: model.apply({'params': p}, x), params, x)
  blk = 'ConvNeXtBlock_0'
  expected = {
    'stem/kernel': _muon(HWIO, '48x16', 'conv kernel (HWIO) 4x4x3'),
    'stem/bias': EW,
    # (7, 7, 1, 16): one input channel per group.
    f'{blk}/dwconv/kernel': ('adam', HWIO, '49x16', 'depthwise conv kernel'),
    f'{blk}/dwconv/bias': EW,
    f'{blk}/LayerNorm_0/scale': EW,
    f'{blk}/LayerNorm_0/bias': EW,
    f'{blk}/pwconv1/kernel': _muon(DENSE, '16x64'),
    f'{blk}/pwconv1/bias': EW,
    f'{blk}/pwconv2/kernel': _muon(DENSE, '64x16'),
    f'{blk}/pwconv2/bias': EW,
    f'{blk}/gamma': EW,
    'head/kernel': _head(DENSE, '16x10'),
    'head/bias': EW,
  }
  return routing, params, expected


def test_convnext_depthwise_to_adam():
  _check(*convnext())


# -- Tied embeddings --------------------------------------------------------


class TiedLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(64, 32, name='wte')
    x = embed(tokens)
    x = x + nn.Dense(32, name='mlp')(nn.LayerNorm()(x))
    return embed.attend(nn.LayerNorm()(x))


@functools.cache
def tied_lm():
  model = TiedLM()
  tokens = jnp.zeros((2, 8), jnp.int32)
  params = _real(jax.eval_shape(model.init, jax.random.key(0), tokens))
  params = params['params']
  routing = trace_routing(
    lambda p, t: model.apply({'params': p}, t), params, tokens
  )
  expected = {
    'wte/embedding': (
      'adam', None, None,
      'gather (embedding); also a matmul operand (tied output head)'),
    'mlp/kernel': _muon(DENSE, '32x32'),
    'mlp/bias': EW,
  }  # fmt: skip
  for i in range(2):
    expected[f'LayerNorm_{i}/scale'] = expected[f'LayerNorm_{i}/bias'] = EW
  return routing, params, expected


def test_tied_embedding_is_adam():
  _check(*tied_lm())


MODELS = {
  'linen_resnet': linen_resnet,
  'linen_scan_transformer': linen_scan_transformer,
  'nnx_vit': nnx_vit,
  'equinox_cnn': equinox_cnn,
  'plain_oihw': plain_oihw,
  'plain_oihw_head_muon': functools.partial(plain_oihw, 'muon'),
  'moe_einsum': moe_einsum,
  'moe_nnx_einsum': moe_nnx_einsum,
  'convnext': convnext,
  'tied_lm': tied_lm,
}


def test_routings_drive_one_update():
  routings = {}
  for name, build in MODELS.items():
    if name == 'equinox_cnn' and importlib.util.find_spec('equinox') is None:
      continue
    routing, params = build()[:2]
    routings[name] = (routing, params)
  _check_update(routings)


# -- How values are followed -------------------------------------------------


@functools.cache
def layouts_and_loops():
  """Transposes, stacked-layer loops, remat, custom rules, cond, shard_map."""
  mesh = jax.make_mesh((1,), ('x',))
  spec = jax.sharding.PartitionSpec()

  @jax.custom_vjp
  def vjp_ident(w):
    return w

  vjp_ident.defvjp(lambda w: (w, None), lambda _, g: (g,))

  @jax.custom_jvp
  def jvp_ident(w):
    return w

  jvp_ident.defjvp(lambda primals, tangents: (primals[0], tangents[0]))

  def fn(p, x):
    x = x @ p['torch'].T  # (out, in) weight, PyTorch layout
    x = lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p['fori'][i]), x)
    for k in range(2):  # static indices: slices, not lookups
      x = x @ p['unrolled'][k]
    x = lax.while_loop(
      lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p['while']), (0, x)
    )[1]
    x = jax.checkpoint(lambda h: h @ p['remat'])(x)
    x = x @ vjp_ident(p['custom_vjp']) @ jvp_ident(p['custom_jvp'])
    x = lax.cond(x.sum() > 0, lambda h: h @ p['cond'], lambda h: -h, x)
    x = jax.shard_map(
      lambda h, w: h @ w, mesh=mesh, in_specs=(spec, spec), out_specs=spec
    )(x, p['shard'])
    x = x @ p['fused'].reshape(16, 2, 16)[:, 0]  # split, slice
    return x @ p['head']

  d = jax.ShapeDtypeStruct((16, 16), jnp.float32)
  params = _real({
    'torch': jax.ShapeDtypeStruct((16, 8), jnp.float32),
    'fori': jax.ShapeDtypeStruct((3, 16, 16), jnp.float32),
    'unrolled': jax.ShapeDtypeStruct((2, 16, 16), jnp.float32),
    **dict.fromkeys(
      ('while', 'remat', 'custom_vjp', 'custom_jvp', 'cond', 'shard'), d),
    'fused': jax.ShapeDtypeStruct((16, 32), jnp.float32),
    'head': jax.ShapeDtypeStruct((16, 10), jnp.float32),
  })  # fmt: skip
  routing = trace_routing(fn, params, jnp.zeros((4, 8)))
  stacked = _muon(DENSE, '3x(16x16)', 'dot_general operand, contracts axis 1')
  followed = ('while', 'remat', 'custom_vjp', 'custom_jvp', 'cond', 'shard')
  expected = {
    'torch': _muon(TORCH, '8x16', 'dot_general operand, contracts axis 1'),
    'fori': stacked,
    'unrolled': _muon(DENSE, '2x(16x16)', STACKED),
    **{k: _muon(DENSE, '16x16', 'dot_general operand, contracts axis 0')
       for k in followed},
    'fused': _muon(DENSE, '16x32'),
    'head': _head(DENSE, '16x10'),
  }  # fmt: skip
  return routing, params, expected


def test_layouts_loops_and_sub_jaxprs():
  _check(*layouts_and_loops())


@functools.cache
def left_to_adam():
  def fn(p, x):
    x = x @ p['tied_ae'] @ p['tied_ae'].T  # two different views
    x = x @ p['tangled'].reshape(8, 6)  # (6, 8) read as (8, 6)
    x = x @ (p['normed'] / jnp.linalg.norm(p['normed']))  # not a re-layout
    x = x @ p['thin']  # 64 x 2
    x = jnp.concatenate([x, x], -1) @ (p['a'] @ p['b'])  # a parameter product
    return x * p['gain']

  params = _real({
    'tied_ae': jax.ShapeDtypeStruct((8, 16), jnp.float32),
    'tangled': jax.ShapeDtypeStruct((6, 8), jnp.float32),
    'normed': jax.ShapeDtypeStruct((6, 64), jnp.float32),
    'thin': jax.ShapeDtypeStruct((64, 2), jnp.float32),
    'a': jax.ShapeDtypeStruct((4, 8), jnp.float32),
    'b': jax.ShapeDtypeStruct((8, 5), jnp.float32),
    'gain': jax.ShapeDtypeStruct((), jnp.float32),
  })  # fmt: skip
  with pytest.warns(UserWarning, match='No parameter is on Muon'):
    routing = trace_routing(fn, params, jnp.zeros((3, 8)))
  with pytest.warns(UserWarning, match='No parameter is on Muon'):
    return muon_optax.route(routing, head='muon'), params


def test_what_is_left_to_adam_and_why():
  routing, _ = left_to_adam()
  reasons = routing.reasons
  assert set(jax.tree.leaves(routing.labels)) == {'adam'}
  assert reasons['tied_ae'] == (
    'conflicting uses: reduction->output axes (0)->(1) vs (1)->(0)'
  )
  assert reasons['tangled'] == (
    'unclassified: dot_general operand whose axis map is ambiguous (leaf '
    'axes 0, 1 both contracted and kept after a reshape)'
  )
  assert reasons['normed'] == (
    'unclassified: dot_general operand only after non-layout ops'
  )
  assert reasons['thin'].startswith('degenerate 64x2; dot_general operand')
  assert routing.views['thin'] == DENSE
  for k in 'ab':
    assert reasons[k].startswith('unclassified')
    assert 'dot_general with no activation operand' in reasons[k]
  assert reasons['gain'] == 'elementwise only'


def test_traces_without_running_or_compiling():
  """ShapeDtypeStructs in, no backend compile, no callback run."""
  events, calls = [], []

  def listener(name, *_, **__):
    if name.endswith(('backend_compile_duration', 'to_mlir_module_duration')):
      events.append(name)

  def fn(p, x):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.tanh(x @ p['w1']) @ p['w2']

  params = {
    'w1': jax.ShapeDtypeStruct((8, 16), jnp.float32),
    'w2': jax.ShapeDtypeStruct((16, 10), jnp.bfloat16),
  }
  x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    routing = trace_routing(fn, params, x)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert events == [] and calls == []
  assert routing.labels == {'w1': 'muon', 'w2': 'adam'}


def test_routing_object_and_errors():
  params = {'w': jnp.zeros((8, 8)), 'b': jnp.zeros(8)}
  with pytest.warns(UserWarning, match='No parameter is on Muon'):
    traced = trace_routing(
      lambda p, x: x @ p['w'] + p['b'], params, jnp.ones((2, 8))
    )
  assert traced.labels == {'w': 'adam', 'b': 'adam'}  # the head
  routing = muon_optax.route(traced, head='muon')
  # One opaque object for optax, not a pytree of its fields.
  assert jax.tree.leaves(routing) == [routing]
  assert repr(routing) == 'Routing(1 muon leaves, 1 adam leaves, from trace)'
  assert routing.by_path()['w'][0] == 'muon'
  assert routing.muon_views() == {'w': DENSE, 'b': None}
  with pytest.raises(ValueError, match='`head`'):
    muon_optax.route(routing, head='sgd')
  # Every keyword goes to the traced function: none is taken as an option.
  seen = {}
  with pytest.warns(UserWarning, match='No parameter is on Muon'):
    trace_routing(lambda p, x, head: seen.setdefault('head', head) and x,
                  params, 1.0, head='muon')  # fmt: skip
  assert seen == {'head': 'muon'}
  with pytest.raises(TypeError, match="Parameter 'name'"):
    trace_routing(lambda p, x: x, {'name': 'abc'}, 1.0)
  # Non-array arguments pass through as they are (flags).
  with pytest.warns(UserWarning, match='No parameter is on Muon'):
    flag = trace_routing(
      lambda p, x, *, use: x @ p['w'] if use else x, params, jnp.ones((2, 8)),
      use=False,
    )  # fmt: skip
  assert flag.reasons['w'] == 'unused'


# -- Extra outputs, one-hot lookups, stop_gradient ------------------------


def _plain_bn_net(p, x):
  """Two convs with batch statistics, returned beside the logits."""
  dn = ('NHWC', 'HWIO', 'NHWC')
  stats = []
  for k in ('c1', 'c2'):
    x = lax.conv_general_dilated(x, p[k], (1, 1), 'SAME', dimension_numbers=dn)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    stats.append((mean, var))
    x = jax.nn.relu((x - mean) / jnp.sqrt(var + 1e-5))
  return x.mean((1, 2)) @ p['w'], stats


def test_returned_batch_statistics_make_no_heads():
  params = {
    'c1': jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32),
    'c2': jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32),
    'w': jax.ShapeDtypeStruct((16, 10), jnp.float32),
  }
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  both = trace_routing(_plain_bn_net, params, x)
  stats_only = trace_routing(lambda p, x: _plain_bn_net(p, x)[1], params, x)
  logits_only = trace_routing(lambda p, x: _plain_bn_net(p, x)[0], params, x)
  expected = {'c1': 'muon', 'c2': 'muon', 'w': 'adam'}
  assert both.labels == logits_only.labels == expected
  # The statistics alone: c2's feed no later matmul in that function.
  assert stats_only.labels['c1'] == 'muon'


def test_one_hot_matmuls_are_lookups_tied_or_not():
  params = {
    'table': jax.ShapeDtypeStruct((50, 16), jnp.float32),
    'w': jax.ShapeDtypeStruct((16, 16), jnp.float32),
    'out': jax.ShapeDtypeStruct((16, 50), jnp.float32),
  }
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)

  def lm(p, t):
    x = jax.nn.one_hot(t, 50) @ p['table']
    return jnp.tanh(x @ p['w']) @ p['out']

  def tied(p, t):
    x = (t[..., None] == jnp.arange(50)).astype(jnp.float32) @ p['table']
    return jnp.tanh(x @ p['w']) @ p['table'].T

  routing = trace_routing(lm, params, tokens)
  assert routing.labels == {'table': 'adam', 'w': 'muon', 'out': 'adam'}
  assert routing.reasons['table'].startswith('one-hot dot_general')
  routing = trace_routing(tied, {k: params[k] for k in ('table', 'w')}, tokens)
  assert routing.labels == {'table': 'adam', 'w': 'muon'}
  assert 'tied output head' in routing.reasons['table']
  # A one-hot of float data is no lookup: a matmul like any other.
  dense = trace_routing(
    lambda p, x: jnp.tanh(x @ p['table']) @ p['w'],
    {k: params[k] for k in ('table', 'w')},
    jax.ShapeDtypeStruct((2, 50), jnp.float32),
  )
  assert dense.labels['table'] == 'muon'


def test_a_prediction_fed_back_through_stop_gradient_stays_a_head():
  """Self-conditioning: the first pass's output, gradients stopped, is an
  input of the second pass; the head is still the head."""
  params = {
    'w1': jax.ShapeDtypeStruct((8, 32), jnp.float32),
    'w2': jax.ShapeDtypeStruct((32, 8), jnp.float32),
  }

  def model(p, x):
    return jnp.tanh(x @ p['w1']) @ p['w2']

  def self_conditioned(p, x):
    first = lax.stop_gradient(model(p, x))
    return model(p, x + first)

  def fed_back(p, x):  # without stop_gradient w2 does feed a matmul
    return model(p, x + model(p, x))

  x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  assert trace_routing(self_conditioned, params, x).labels == {
    'w1': 'muon',
    'w2': 'adam',
  }
  assert trace_routing(fed_back, params, x).labels == {
    'w1': 'muon',
    'w2': 'muon',
  }
