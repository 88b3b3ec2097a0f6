"""The examples route by their NNX modules' layer types
(`param_labels=model`); on every example model that is exactly what
`muon_optax.trace_routing` reads from the computation."""

from convnet import models as convnet_models
from diffusion import models as diffusion_models
from flax import nnx
import jax
import jax.numpy as jnp
import pytest
from resnet import models as resnet_models
from transformer import models as transformer_models

import muon_optax

IMAGES = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
TOKENS = jax.ShapeDtypeStruct((2, 16), jnp.int32)
TIMES = jax.ShapeDtypeStruct((2,), jnp.int32)

MODELS = {
  'convnet': (
    lambda: convnet_models.ConvNet(10, (8, 16, 16), rngs=nnx.Rngs(0)),
    (IMAGES,),
  ),
  'resnet': (
    lambda: resnet_models.ResNet(10, width=8, rngs=nnx.Rngs(0)),
    (IMAGES,),
  ),
  'transformer': (
    lambda: transformer_models.Transformer(
      256, 16, d_model=32, num_layers=2, num_heads=4, rngs=nnx.Rngs(0)
    ),
    (TOKENS,),
  ),
  'diffusion': (
    lambda: diffusion_models.UNet(widths=(8, 16), rngs=nnx.Rngs(0)),
    (IMAGES, TIMES),
  ),
}


def _flat(tree):
  is_leaf = lambda v: v is None or isinstance(v, muon_optax.MatrixView)
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {jax.tree_util.keystr(k): v for k, v in leaves}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_module_rules_equal_the_traced_routing(name):
  make, inputs = MODELS[name]
  model = make()
  model.eval()  # BatchNorm reads its running statistics: nothing mutates
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  traced = muon_optax.trace_routing(
    lambda p, *xs: nnx.merge(graphdef, p, rest)(*xs), params, *inputs
  )
  shapes = {k: v.shape for k, v in _flat(nnx.to_pure_dict(params)).items()}
  routing = muon_optax.route(model)
  labels, traced_labels = _flat(routing.labels), _flat(traced.labels)
  views, traced_views = _flat(routing.views), _flat(traced.views)
  assert labels == traced_labels
  assert 'muon' in labels.values() and 'adam' in labels.values()
  for path, label in labels.items():
    if label == 'muon':
      ours = views[path].resolve(shapes[path])
      theirs = traced_views[path].resolve(shapes[path])
      assert ours.matrix_shape == theirs.matrix_shape, path
      assert ours.num_matrices == theirs.num_matrices, path
