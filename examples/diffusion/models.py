"""A small DDPM U-Net for 32x32 images, in Flax NNX.

Residual conv blocks with GroupNorm and the time embedding added, a strided
conv down and a transposed conv up at each level, one self-attention block
at the lowest resolution, skip connections by concatenation, and an output
conv called `head` (so `muon_optax` sends it to Adam by name).
"""

from collections.abc import Sequence
import math

from flax import nnx
import jax
import jax.numpy as jnp


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal features of the (integer or real) timesteps `t`, (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _groups(channels: int, groups: int) -> int:
  """The largest group count <= `groups` that divides `channels`."""
  return max(g for g in range(1, groups + 1) if channels % g == 0)


class ResBlock(nnx.Module):
  """GroupNorm → SiLU → conv, + the time embedding, GroupNorm → SiLU → conv,
  with a 1x1 conv on the shortcut when the width changes."""

  def __init__(
    self, cin: int, cout: int, temb_dim: int, groups: int, *, rngs: nnx.Rngs
  ):
    self.norm1 = nnx.GroupNorm(cin, num_groups=_groups(cin, groups), rngs=rngs)
    self.conv1 = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
    self.time = nnx.Linear(temb_dim, cout, rngs=rngs)
    self.norm2 = nnx.GroupNorm(
      cout, num_groups=_groups(cout, groups), rngs=rngs
    )
    self.conv2 = nnx.Conv(cout, cout, (3, 3), rngs=rngs)
    self.shortcut = (
      nnx.Conv(cin, cout, (1, 1), rngs=rngs) if cin != cout else None
    )

  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = h + self.time(nnx.silu(temb))[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    return h + (x if self.shortcut is None else self.shortcut(x))


class AttentionBlock(nnx.Module):
  """GroupNorm → multi-head self-attention over the pixels, residual."""

  def __init__(self, channels: int, heads: int, groups: int, *, rngs):
    self.norm = nnx.GroupNorm(
      channels, num_groups=_groups(channels, groups), rngs=rngs
    )
    self.attention = nnx.MultiHeadAttention(
      num_heads=heads, in_features=channels, decode=False, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = self.norm(x).reshape(b, h * w, c)
    return x + self.attention(y).reshape(b, h, w, c)


class UNet(nnx.Module):
  """Predicts the noise ε in a noised image `x_t` at timestep `t`.

  `widths[i]` channels at resolution 32/2^i; `blocks` residual blocks per
  level on the way down and up; attention and two residual blocks at the
  lowest resolution. `train_test.py` checks the shapes.
  """

  def __init__(
    self,
    widths: Sequence[int] = (32, 64, 128),
    blocks: int = 1,
    heads: int = 4,
    groups: int = 8,
    channels: int = 3,
    patch: int = 2,
    *,
    rngs: nnx.Rngs,
  ):
    widths = tuple(widths)
    self.base = widths[0]
    temb = 4 * widths[0]
    self.time_mlp1 = nnx.Linear(widths[0], temb, rngs=rngs)
    self.time_mlp2 = nnx.Linear(temb, temb, rngs=rngs)
    p = (patch, patch)
    # A patch x patch stride-patch stem and a transposed-conv head: the
    # levels run at 32/patch and below, which keeps a CPU step short.
    self.conv_in = nnx.Conv(
      channels, widths[0], p, strides=p, padding='VALID', rngs=rngs
    )

    down, downsample, skips = [], [], []
    for i, w in enumerate(widths):
      level = []
      for _ in range(blocks):
        level.append(ResBlock(w, w, temb, groups, rngs=rngs))
        skips.append(w)
      down.append(nnx.List(level))
      if i + 1 < len(widths):
        downsample.append(
          nnx.Conv(w, widths[i + 1], (3, 3), strides=(2, 2), rngs=rngs)
        )
    self.down = nnx.List(down)
    self.downsample = nnx.List(downsample)

    bottom = widths[-1]
    self.mid1 = ResBlock(bottom, bottom, temb, groups, rngs=rngs)
    self.mid_attention = AttentionBlock(bottom, heads, groups, rngs=rngs)
    self.mid2 = ResBlock(bottom, bottom, temb, groups, rngs=rngs)

    up, upsample = [], []
    for i in reversed(range(len(widths))):
      w = widths[i]
      level = [
        ResBlock(w + skips.pop(), w, temb, groups, rngs=rngs)
        for _ in range(blocks)
      ]
      up.append(nnx.List(level))
      if i > 0:
        upsample.append(
          nnx.ConvTranspose(w, widths[i - 1], (4, 4), strides=(2, 2), rngs=rngs)
        )
    self.up = nnx.List(up)
    self.upsample = nnx.List(upsample)

    self.norm_out = nnx.GroupNorm(
      widths[0], num_groups=_groups(widths[0], groups), rngs=rngs
    )
    self.head = nnx.ConvTranspose(
      widths[0], channels, p, strides=p, padding='VALID', rngs=rngs
    )

  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    temb = timestep_embedding(t, self.base)
    temb = self.time_mlp2(nnx.silu(self.time_mlp1(temb)))
    h = self.conv_in(x)
    skips = []
    for i, level in enumerate(self.down):
      for block in level:
        h = block(h, temb)
        skips.append(h)
      if i < len(self.downsample):
        h = self.downsample[i](h)
    h = self.mid2(self.mid_attention(self.mid1(h, temb)), temb)
    for i, level in enumerate(self.up):
      for block in level:
        h = block(jnp.concatenate([h, skips.pop()], axis=-1), temb)
      if i < len(self.upsample):
        h = self.upsample[i](h)
    return self.head(nnx.silu(self.norm_out(h)))
