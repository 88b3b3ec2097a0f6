"""A small airbench-style ConvNet for 32x32 RGB images, in Flax NNX."""

from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp


class ConvGroup(nnx.Module):
  """conv → max-pool → BN → GELU → conv → BN → GELU (airbench's block)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(
      in_features, out_features, (3, 3), use_bias=False, rngs=rngs
    )
    self.norm1 = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(
      out_features, out_features, (3, 3), use_bias=False, rngs=rngs
    )
    self.norm2 = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv1(x)
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = nnx.gelu(self.norm1(x))
    return nnx.gelu(self.norm2(self.conv2(x)))


class ConvNet(nnx.Module):
  """2x2 patch stem, one `ConvGroup` per width, global max-pool, linear `head`.

  The final layer is called `head`, so `muon_optax.route` sends it to
  Adam; every conv kernel (stem included) goes to Muon by default.

  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> model = ConvNet(num_classes=10, widths=(8, 8, 16), rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 32, 32, 3))).shape
  (2, 10)
  """

  def __init__(
    self,
    num_classes: int,
    widths: Sequence[int] = (24, 32, 64, 128),
    *,
    rngs: nnx.Rngs,
  ):
    # A 2x2 stride-2 patch stem (airbench's first layer is a 2x2 conv): the
    # groups then run at 16x16, which keeps a CPU epoch short.
    self.stem = nnx.Conv(
      3,
      widths[0],
      (2, 2),
      strides=(2, 2),
      padding='VALID',
      use_bias=False,
      rngs=rngs,
    )
    self.stem_norm = nnx.BatchNorm(widths[0], momentum=0.9, rngs=rngs)
    self.groups = nnx.List(
      [
        ConvGroup(cin, cout, rngs=rngs)
        for cin, cout in zip(widths[:-1], widths[1:], strict=False)
      ]
    )
    self.head = nnx.Linear(widths[-1], num_classes, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.gelu(self.stem_norm(self.stem(x)))
    for group in self.groups:
      x = group(x)
    x = jnp.max(x, axis=(1, 2))
    return self.head(x)
