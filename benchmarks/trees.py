"""Parameter trees for the update benchmarks, with their routing.

Each tree comes with its labels (`'muon'` / `'adam'`) and the matching
`optax.contrib.MuonDimensionNumbers`, so muon_optax and optax.contrib.muon
orthogonalize exactly the same leaves with the same matrix views.
"""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

DENSE = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
CONV = optax.contrib.MuonDimensionNumbers(
  reduction_axis=(0, 1, 2), output_axis=3
)


@dataclasses.dataclass
class Tree:
  """A parameter tree, the label of every leaf and its dimension numbers."""

  name: str
  params: Any
  labels: Any  # 'muon' or 'adam' per leaf
  dims: Any  # MuonDimensionNumbers per Muon leaf, None per Adam leaf

  def muon_matrices(self) -> list[tuple[int, int, int]]:
    """(batch, fan_in, fan_out) of every Muon leaf."""
    out = []
    for p, lab in zip(
      jax.tree.leaves(self.params), jax.tree.leaves(self.labels), strict=True
    ):
      if lab == 'muon':
        *spatial_in, fan_out = p.shape
        out.append((1, math.prod(spatial_in), fan_out))
    return out

  def describe(self) -> dict[str, Any]:
    mats = self.muon_matrices()
    shapes: dict[str, int] = {}
    for _, m, n in mats:
      shapes[f'{m}x{n}'] = shapes.get(f'{m}x{n}', 0) + 1
    return {
      'name': self.name,
      'params': sum(p.size for p in jax.tree.leaves(self.params)),
      'muon_params': sum(m * n for _, m, n in mats),
      'muon_matrices': len(mats),
      'matrix_shapes': shapes,
    }


def _normal(key, shape, scale=0.02):
  return scale * jax.random.normal(key, shape, jnp.float32)


def gpt(
  num_layers: int = 12,
  d: int = 384,
  vocab: int = 8192,
  seq_len: int = 1024,
  seed: int = 0,
) -> Tree:
  """A GPT-2-like tree: 2-D q/k/v/o and 4d MLP matrices per layer.

  Token and position embeddings, the output head, LayerNorm gains and biases
  go to Adam; the 6 matrices of every layer go to Muon.
  """
  keys = iter(jax.random.split(jax.random.key(seed), 8 * num_layers + 8))
  params: dict[str, Any] = {
    'embed': {'embedding': _normal(next(keys), (vocab, d))},
    'pos_embed': {'embedding': _normal(next(keys), (seq_len, d))},
  }
  labels: dict[str, Any] = {
    'embed': {'embedding': 'adam'},
    'pos_embed': {'embedding': 'adam'},
  }
  ln = lambda: {'scale': jnp.ones((d,)), 'bias': jnp.zeros((d,))}
  ln_labels = {'scale': 'adam', 'bias': 'adam'}
  for i in range(num_layers):
    layer = {'ln1': ln(), 'ln2': ln()}
    lab = {'ln1': dict(ln_labels), 'ln2': dict(ln_labels)}
    for name in ('query', 'key', 'value', 'out'):
      layer[name] = {
        'kernel': _normal(next(keys), (d, d)),
        'bias': jnp.zeros((d,)),
      }
      lab[name] = {'kernel': 'muon', 'bias': 'adam'}
    layer['fc'] = {
      'kernel': _normal(next(keys), (d, 4 * d)),
      'bias': jnp.zeros((4 * d,)),
    }
    layer['proj'] = {
      'kernel': _normal(next(keys), (4 * d, d)),
      'bias': jnp.zeros((d,)),
    }
    lab['fc'] = {'kernel': 'muon', 'bias': 'adam'}
    lab['proj'] = {'kernel': 'muon', 'bias': 'adam'}
    params[f'layer_{i}'] = layer
    labels[f'layer_{i}'] = lab
  params['ln_f'] = ln()
  labels['ln_f'] = dict(ln_labels)
  params['head'] = {'kernel': _normal(next(keys), (d, vocab))}
  labels['head'] = {'kernel': 'adam'}
  dims = jax.tree.map(lambda lab: DENSE if lab == 'muon' else None, labels)
  name = f'gpt{num_layers}_d{d}'
  return Tree(name, params, labels, dims)


def resnet(
  widths: Sequence[int] = (32, 64, 128, 256),
  blocks: Sequence[int] = (2, 2, 2, 2),
  num_classes: int = 10,
  seed: int = 0,
) -> Tree:
  """A ResNet-18-like tree (CIFAR stem): every conv kernel goes to Muon.

  3x3 convs are `(3, 3, in, out)` kernels, viewed as `(9 * in, out)`
  matrices; the 1x1 projection shortcuts as `(in, out)`. BatchNorm scales and
  biases and the linear head go to Adam.
  """
  keys = iter(jax.random.split(jax.random.key(seed), 4 * sum(blocks) + 8))
  bn = lambda c: {'scale': jnp.ones((c,)), 'bias': jnp.zeros((c,))}
  bn_labels = {'scale': 'adam', 'bias': 'adam'}
  conv = lambda k, cin, cout: _normal(
    next(keys), (k, k, cin, cout), (2 / (k * k * cin)) ** 0.5
  )
  params: dict[str, Any] = {
    'stem': {'kernel': conv(3, 3, widths[0])},
    'stem_bn': bn(widths[0]),
  }
  labels: dict[str, Any] = {'stem': {'kernel': 'muon'}, 'stem_bn': bn_labels}
  cin = widths[0]
  for s, (w, nb) in enumerate(zip(widths, blocks, strict=True)):
    for b in range(nb):
      block = {
        'conv1': {'kernel': conv(3, cin, w)},
        'bn1': bn(w),
        'conv2': {'kernel': conv(3, w, w)},
        'bn2': bn(w),
      }
      lab = {
        'conv1': {'kernel': 'muon'},
        'bn1': dict(bn_labels),
        'conv2': {'kernel': 'muon'},
        'bn2': dict(bn_labels),
      }
      if cin != w:
        block['shortcut'] = {'kernel': conv(1, cin, w)}
        block['shortcut_bn'] = bn(w)
        lab['shortcut'] = {'kernel': 'muon'}
        lab['shortcut_bn'] = dict(bn_labels)
      params[f'stage{s}_block{b}'] = block
      labels[f'stage{s}_block{b}'] = lab
      cin = w
  params['head'] = {
    'kernel': _normal(next(keys), (cin, num_classes)),
    'bias': jnp.zeros((num_classes,)),
  }
  labels['head'] = {'kernel': 'adam', 'bias': 'adam'}
  dims = jax.tree.map(
    lambda p, lab: (CONV if p.ndim == 4 else DENSE) if lab == 'muon' else None,
    params,
    labels,
  )
  return Tree(f'resnet18_w{widths[0]}', params, labels, dims)
