"""Routing of Equinox models by their layer types (`muon_optax._equinox`)."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_optax

eqx = pytest.importorskip('equinox')


class CNN(eqx.Module):
  """An image and a class id in, 10 logits out: every layer kind at once."""

  conv1: eqx.nn.Conv2d
  dw: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  norm: eqx.nn.GroupNorm
  embed: eqx.nn.Embedding
  attn: eqx.nn.MultiheadAttention
  mlp: eqx.nn.MLP
  head: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 7)
    self.conv1 = eqx.nn.Conv2d(3, 16, 3, padding=1, key=k[0])
    self.dw = eqx.nn.Conv2d(16, 16, 3, padding=1, groups=16, key=k[1])
    self.conv2 = eqx.nn.Conv2d(16, 32, 3, padding=1, key=k[2])
    self.norm = eqx.nn.GroupNorm(4, 32)
    self.embed = eqx.nn.Embedding(20, 32, key=k[3])
    self.attn = eqx.nn.MultiheadAttention(4, 32, key=k[4])
    self.mlp = eqx.nn.MLP(32, 32, 64, 1, key=k[5])
    self.head = eqx.nn.Linear(32, 10, key=k[6])

  def __call__(self, x, label):
    h = jax.nn.relu(self.conv1(x))
    h = self.norm(jax.nn.relu(self.conv2(self.dw(h))))
    tokens = h.reshape(32, -1).T
    out = self.attn(self.embed(label)[None], tokens, tokens)[0]
    return self.head(self.mlp(out))


def build(cls, *args, **kwargs):
  """`cls(*args, **kwargs)` with NumPy normals of std 1/sqrt(fan_in).

  `eqx.filter_eval_shape` and NumPy: initialising with jax.random would
  compile a kernel per shape.
  """
  rng = np.random.default_rng(0)

  def fill(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x
    fan_in = math.prod(x.shape[1:]) if len(x.shape) >= 2 else 100
    return (rng.standard_normal(x.shape) / math.sqrt(fan_in)).astype(x.dtype)

  return jax.tree.map(fill, eqx.filter_eval_shape(cls, *args, **kwargs))


@functools.cache
def cnn():
  return build(CNN, jax.random.key(0))


# path -> (label, matrix shape (fan_in, fan_out) of a Muon leaf), by hand:
# Equinox weights are (out, in // groups, *spatial).
CNN_EXPECTED = {
  'conv1/weight': ('muon', (3 * 3 * 3, 16)),
  'conv1/bias': ('adam', None),
  'dw/weight': ('adam', None),  # depthwise: one input channel per group
  'dw/bias': ('adam', None),
  'conv2/weight': ('muon', (16 * 3 * 3, 32)),
  'conv2/bias': ('adam', None),
  'norm/weight': ('adam', None),
  'norm/bias': ('adam', None),
  'embed/weight': ('adam', None),
  'attn/query_proj/weight': ('muon', (32, 32)),
  'attn/key_proj/weight': ('muon', (32, 32)),
  'attn/value_proj/weight': ('muon', (32, 32)),
  'attn/output_proj/weight': ('muon', (32, 32)),
  'mlp/layers/0/weight': ('muon', (32, 64)),
  'mlp/layers/0/bias': ('adam', None),
  'mlp/layers/1/weight': ('muon', (64, 32)),  # inside: not the model's output
  'mlp/layers/1/bias': ('adam', None),
  'head/weight': ('adam', None),
  'head/bias': ('adam', None),
}


def _flat(tree, is_leaf=None):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {
    jax.tree_util.keystr(kp, simple=True, separator='/'): x for kp, x in flat
  }


def _table(text):
  """`describe`'s rows as {path: (label, matrix view, why)}."""
  rows = {}
  for line in text.splitlines()[1:]:
    cells = re.split(r'\s{2,}', line)
    if len(cells) == 6:
      path, _, label, view, _, why = cells
      rows[path] = (label, view, why)
  return rows


def _is_view(x):
  return x is None or isinstance(x, muon_optax.MatrixView)


def test_cnn_labels_and_matrix_shapes():
  model = cnn()
  params = _flat(eqx.filter(model, eqx.is_inexact_array))
  assert set(params) == set(CNN_EXPECTED)

  rows = _table(muon_optax.describe(model))
  labels = muon_optax.route(model).labels
  views = muon_optax.route(model).views
  assert type(labels) is CNN and type(views) is CNN
  labels, views = _flat(labels), _flat(views, is_leaf=_is_view)
  for path, (label, matrix) in CNN_EXPECTED.items():
    assert labels[path] == rows[path][0] == label, path
    if label == 'muon':
      assert rows[path][1] == f'{matrix[0]}x{matrix[1]}', path
      # The view's axes read the (out, ...) weight as NumPy's reshape does.
      w = np.asarray(params[path])
      v = views[path].resolve(w.shape)
      perm = v.batch_axes + v.reduction_axes + v.output_axes
      got = np.transpose(w, perm).reshape(matrix)
      np.testing.assert_array_equal(got, w.reshape(w.shape[0], -1).T)
  assert rows['dw/weight'][2] == 'depthwise conv (Conv2d)'
  assert rows['embed/weight'][2] == 'embedding (Embedding)'
  assert rows['head/weight'][2] == "output head; named 'head'; linear (Linear)"
  assert rows['attn/query_proj/weight'][2] == 'linear (Linear)'


def test_trace_routing_agrees_with_the_module_rules():
  model = cnn()
  params, static = eqx.partition(model, eqx.is_inexact_array)
  traced = muon_optax.trace_routing(
    lambda p, x, y: eqx.combine(p, static)(x, y),
    params,
    jnp.zeros((3, 8, 8)),
    jnp.array(3),
  )
  # The module rules give the head's and the depthwise kernel's view too, as
  # the trace does; labels and views agree leaf by leaf.
  views = _flat(muon_optax.route(model).views, is_leaf=_is_view)
  labels = _flat(muon_optax.route(model).labels)
  want = {p: (label, views[p]) for p, label in labels.items()}
  got = {p: (r.label, r.view) for p, r in traced.by_path().items()}
  assert got == want


class Tutorial(eqx.Module):
  """Equinox's CNN tutorial layout: a list of layers and functions."""

  layers: list

  def __init__(self, key):
    k = jax.random.split(key, 4)
    self.layers = [
      eqx.nn.Conv2d(1, 8, 4, key=k[0]),
      eqx.nn.MaxPool2d(2),
      jax.nn.relu,
      jnp.ravel,
      eqx.nn.Linear(8 * 24 * 24, 64, key=k[1]),
      jax.nn.sigmoid,
      eqx.nn.Linear(64, 64, key=k[2]),
      eqx.nn.Linear(64, 10, key=k[3]),
      jax.nn.log_softmax,
    ]

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def _whys(model):
  return {
    p: (r[0], r[2]) for p, r in _table(muon_optax.describe(model)).items()
  }


def test_output_layer_without_a_head_name():
  key = jax.random.key(1)
  mlp_head = ('adam', 'output head; the last layer of MLP; linear (Linear)')
  # An MLP as the whole model: its last layer is the output layer.
  whys = _whys(build(eqx.nn.MLP, 8, 10, 32, 2, key=key))
  assert whys['layers/2/weight'] == mlp_head
  assert whys['layers/1/weight'] == ('muon', 'linear (Linear)')
  # Stacked hidden layers (scan=True) are a batch of matrices.
  mlp = build(eqx.nn.MLP, 8, 10, 32, 3, key=key, scan=True)
  rows = _table(muon_optax.describe(mlp))
  assert rows['layers/1/weight'][:2] == ('muon', '2x(32x32)')
  assert rows['layers/2/weight'][2] == mlp_head[1]
  # The tutorial's list of layers ends with a Linear before a function.
  whys = _whys(build(Tutorial, key))
  head = ('adam', 'output head; the last layer of the model; linear (Linear)')
  assert whys['layers/7/weight'] == head
  assert whys['layers/6/weight'] == ('muon', 'linear (Linear)')

  class Encoder(eqx.Module):
    conv: eqx.nn.Conv2d
    mlp: eqx.nn.MLP  # the last field: the output end

  model = build(
    lambda k: Encoder(
      eqx.nn.Conv2d(3, 8, 3, key=k), eqx.nn.MLP(8, 4, 16, 1, key=k)
    ),
    key,
  )
  assert _whys(model)['mlp/layers/1/weight'] == mlp_head


def test_no_output_layer_guessed_inside_blocks():
  linear = ('muon', 'linear (Linear)')

  class Block(eqx.Module):
    norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

  class TiedLM(eqx.Module):  # the head is the embedding, transposed
    embed: eqx.nn.Embedding
    blocks: list

  def tied_lm(k):
    block = Block(eqx.nn.LayerNorm(16), eqx.nn.MLP(16, 16, 64, 1, key=k))
    return TiedLM(eqx.nn.Embedding(50, 16, key=k), [block, block])

  whys = _whys(build(tied_lm, jax.random.key(2)))
  assert whys['blocks/1/mlp/layers/1/weight'] == linear

  class Branches(eqx.Module):  # a dict is ordered by key, not by use
    branches: dict

  def branches(k):
    return Branches(
      {'a': eqx.nn.Linear(8, 8, key=k), 'z': eqx.nn.Linear(8, 8, key=k)}
    )

  whys = _whys(build(branches, jax.random.key(2)))
  assert whys['branches/z/weight'] == linear

  class Named(eqx.Module):
    mlp: eqx.nn.MLP
    head: eqx.nn.Sequential  # a named head: every layer in it is the head

  def named(k):
    return Named(
      eqx.nn.MLP(8, 8, 16, 1, key=k),
      eqx.nn.Sequential(
        [
          eqx.nn.Linear(8, 16, key=k),
          eqx.nn.Lambda(jax.nn.relu),
          eqx.nn.Linear(16, 10, key=k),
        ]
      ),
    )

  whys = _whys(build(named, jax.random.key(2)))
  assert whys['mlp/layers/1/weight'] == linear
  assert whys['head/layers/0/weight'] == (
    'adam',
    "output head; named 'head'; linear (Linear)",
  )
  assert whys['head/layers/2/weight'] == (
    'adam',
    "output head; named 'head'; linear (Linear)",
  )


def test_transposed_conv_recurrent_and_norm_layers():
  class Decoder(eqx.Module):
    up: eqx.nn.ConvTranspose2d
    grouped: eqx.nn.ConvTranspose2d
    cell: eqx.nn.GRUCell
    norm: eqx.nn.LayerNorm
    out: eqx.nn.Conv2d

  def decoder(k):
    return Decoder(
      eqx.nn.ConvTranspose2d(16, 8, 3, stride=2, key=k),
      eqx.nn.ConvTranspose2d(8, 8, (3, 2), groups=2, key=k),
      eqx.nn.GRUCell(8, 16, key=k),
      eqx.nn.LayerNorm((4, 8)),  # a 2-D weight that is no matrix
      eqx.nn.Conv2d(8, 3, 1, key=k),
    )

  rows = _table(muon_optax.describe(build(decoder, jax.random.key(3))))
  # ConvTranspose runs its (out, in // groups, kh, kw) kernel as a conv.
  assert rows['up/weight'][:2] == ('muon', f'{16 * 3 * 3}x8')
  assert rows['grouped/weight'][:2] == ('muon', f'{4 * 3 * 2}x8')
  # GRU weights are (3 * hidden, in): the three gates side by side.
  assert rows['cell/weight_ih'][:2] == ('muon', '8x48')
  assert rows['cell/weight_hh'][:2] == ('muon', '16x48')
  assert rows['norm/weight'] == ('adam', '-', 'weight (LayerNorm)')
  assert rows['out/weight'][2] == (
    'output head; the last layer of the model; conv (out, in, *spatial) (Conv2d)'
  )


def _batch(n=8):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, 3, 8, 8)), jnp.float32)
  return x, jnp.arange(n) % 20, jnp.arange(n) % 10


def _loss(model, x, c, y):
  logits = jax.vmap(model)(x, c)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_muon_trains_an_equinox_model():
  model = cnn()
  tx = muon_optax.muon(3e-2, param_labels=model)
  state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  @eqx.filter_jit
  def step(model, state, x, c, y):
    loss, grads = eqx.filter_value_and_grad(_loss)(model, x, c, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, state = tx.update(grads, state, params)
    return eqx.apply_updates(model, updates), state, loss

  losses = []
  batch = _batch()
  for _ in range(10):
    model, state, loss = step(model, state, *batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.85 * losses[0]


class Small(eqx.Module):
  conv: eqx.nn.Conv2d
  head: eqx.nn.Linear


def test_label_and_view_trees_that_are_modules():
  model = build(
    lambda k: Small(
      eqx.nn.Conv2d(8, 16, 3, key=k), eqx.nn.Linear(16, 10, key=k)
    ),
    jax.random.key(4),
  )
  params = eqx.filter(model, eqx.is_inexact_array)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(
    lambda x: rng.standard_normal(x.shape).astype(np.float32), params
  )
  labels = muon_optax.route(model).labels
  views = muon_optax.route(model).views
  assert type(labels) is Small and type(views) is Small

  all_adam = jax.tree.map(lambda _: 'adam', params)  # built by hand
  txs = [
    muon_optax.muon(0.1, param_labels=labels, matrix_views=views),
    muon_optax.muon(0.1, param_labels=all_adam),
    optax.adam(0.1),
  ]
  # One compile for the three.
  got, hand, adam = map(
    _flat,
    jax.jit(lambda g: [tx.update(g, tx.init(params), params)[0] for tx in txs])(
      grads
    ),
  )
  g = _flat(grads)
  # Adam's first step is -lr * g / (|g| + eps), bias-corrected; Muon's an
  # orthogonal matrix times -lr * 0.2 * sqrt(max(fan_in, fan_out)).
  for path in ('conv/bias', 'head/weight', 'head/bias'):
    want = -0.1 * g[path] / (np.abs(g[path]) + 1e-8)
    np.testing.assert_allclose(got[path], want, rtol=1e-4, err_msg=path)
  matrix = np.asarray(got['conv/weight']).reshape(16, -1).T  # (72, 16)
  s = np.linalg.svd(matrix / (-0.1 * 0.2 * np.sqrt(72)), compute_uv=False)
  assert 0.5 < s.min() and s.max() < 1.25
  # A module of labels is a label tree, not a model to route.
  for path, u in adam.items():
    np.testing.assert_allclose(hand[path], u, rtol=1e-5, err_msg=path)


def test_override_that_matches_nothing():
  with pytest.raises(ValueError, match=r"\['stemm'\] match no parameter"):
    muon_optax.route(cnn(), overrides={'stemm': 'adam'})
  labels = _flat(muon_optax.route(cnn(), overrides={'conv1': 'adam'}).labels)
  assert labels['conv1/weight'] == 'adam' and labels['conv2/weight'] == 'muon'


class Stacked(eqx.Module):
  """Six vmapped `Linear(32, 64)`: weights `(6, 64, 32)`, then a head."""

  blocks: eqx.nn.Linear
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    make = lambda k: eqx.nn.Linear(32, 64, key=k)
    self.blocks = eqx.filter_vmap(make)(jax.random.split(k1, 6))
    self.head = eqx.nn.Linear(64, 10, key=k2)


def test_default_views_come_from_the_layer_types():
  # Without `param_labels` the labels come from the layer types; the views
  # must too, or the stacked weight would be one 2048x6 matrix, not six
  # 32x64 ones (consistent_rms=None: each slice orthogonal on its own).
  model = build(Stacked, jax.random.key(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  grads = jax.tree.map(
    lambda x: jnp.asarray(np.random.default_rng(1).normal(size=x.shape)),
    params,
  )
  for labels in (None, model):
    tx = muon_optax.muon(1.0, param_labels=labels, consistent_rms=None)
    updates, _ = tx.update(grads, tx.init(params), params)
    for w, g in zip(updates.blocks.weight, grads.blocks.weight, strict=True):
      u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
      w = -np.asarray(w, np.float64)  # up to the shape scale: its polar factor
      cos = np.sum(w * (u @ vt)) / np.linalg.norm(w) / np.linalg.norm(u @ vt)
      sv = np.linalg.svd(w, compute_uv=False)
      assert cos > 0.95 and sv.max() < 1.5 * sv.min(), (labels, cos, sv)
  assert '6x(32x64)' in muon_optax.describe(model)
