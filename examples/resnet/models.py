"""A CIFAR ResNet-18 (He et al. 2016, the CIFAR variant), in Flax NNX."""

from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp


class BasicBlock(nnx.Module):
  """Two 3x3 convs with BatchNorm, plus the shortcut (a 1x1 conv and BN
  where the shape changes)."""

  def __init__(
    self, in_features: int, features: int, strides: int, *, rngs: nnx.Rngs
  ):
    self.conv1 = nnx.Conv(
      in_features,
      features,
      (3, 3),
      strides=strides,
      use_bias=False,
      rngs=rngs,
    )
    self.norm1 = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(features, features, (3, 3), use_bias=False, rngs=rngs)
    self.norm2 = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
    if strides == 1 and in_features == features:
      self.shortcut = self.shortcut_norm = None
    else:
      self.shortcut = nnx.Conv(
        in_features,
        features,
        (1, 1),
        strides=strides,
        use_bias=False,
        rngs=rngs,
      )
      self.shortcut_norm = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    if self.shortcut is not None:
      x = self.shortcut_norm(self.shortcut(x))
    return nnx.relu(x + y)


class ResNet(nnx.Module):
  """3x3 stem, stages of `BasicBlock`s doubling the width, average pool, head.

  `stage_sizes=(2, 2, 2, 2)` is ResNet-18 (11.2M parameters at `width=64`,
  the usual CIFAR width; 0.70M at 16). Every conv kernel (the stem and the
  1x1 projections included) goes to Muon under `muon_optax.route`;
  the BatchNorm parameters and `head` go to Adam.

  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> model = ResNet(10, width=4, stage_sizes=(1, 1), rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 32, 32, 3))).shape
  (2, 10)
  """

  def __init__(
    self,
    num_classes: int,
    *,
    width: int = 64,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
    rngs: nnx.Rngs,
  ):
    self.stem = nnx.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
    self.stem_norm = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    blocks, in_features = [], width
    for i, size in enumerate(stage_sizes):
      features = width * 2**i
      for j in range(size):
        strides = 2 if i > 0 and j == 0 else 1
        blocks.append(BasicBlock(in_features, features, strides, rngs=rngs))
        in_features = features
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))
