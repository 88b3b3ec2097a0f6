"""The diffusion process: a cosine noise schedule, noising, the ε-prediction
loss, and a DDIM sampler.

Ho et al., Denoising Diffusion Probabilistic Models (arXiv 2006.11239);
Nichol & Dhariwal, Improved DDPM (arXiv 2102.09672) for the cosine schedule;
Song et al., DDIM (arXiv 2010.02502) for the sampler.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def cosine_alpha_bars(timesteps: int, s: float = 0.008) -> np.ndarray:
  """ᾱ_t for t = 0..timesteps-1: the cosine schedule, each β capped at 0.999.

  >>> a = cosine_alpha_bars(1000)
  >>> bool(a[0] > 0.9999 and a[-1] < 1e-4 and (np.diff(a) < 0).all())
  True
  """
  steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
  f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
  return np.cumprod(1 - betas).astype(np.float32)


def add_noise(
  x0: jax.Array, t: jax.Array, noise: jax.Array, alpha_bars: jax.Array
) -> jax.Array:
  """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, per image of the batch."""
  a = alpha_bars[t][:, None, None, None]
  return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def denoising_loss(
  predict: Callable[[jax.Array, jax.Array], jax.Array],
  x0: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  alpha_bars: jax.Array,
) -> jax.Array:
  """Per image, the mean squared error of the predicted noise (L_simple)."""
  eps = predict(add_noise(x0, t, noise, alpha_bars), t)
  return jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))


def eval_timesteps(n: int, levels: int, timesteps: int) -> np.ndarray:
  """The fixed noise level of each of `n` held-out images: image i gets the
  midpoint of stratum i mod `levels` of [0, timesteps), so every level is
  scored on the same number of images.

  >>> eval_timesteps(5, 2, 1000).tolist()
  [250, 750, 250, 750, 250]
  """
  strata = ((np.arange(levels) + 0.5) * timesteps / levels).astype(np.int32)
  return strata[np.arange(n) % levels]


def eval_noise(key: jax.Array, first: int, n: int, shape) -> jax.Array:
  """The fixed noise of images `first..first+n-1`: image i's draw depends on
  `key` and i alone, whatever the batch size, for a key whose draws under
  `vmap` do not depend on the batch (threefry's, not 'rbg's)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n))
  return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def ddim_sample(
  predict: Callable[[jax.Array, jax.Array], jax.Array],
  noise: jax.Array,
  alpha_bars: jax.Array,
  steps: int,
) -> jax.Array:
  """Deterministic DDIM (η = 0) from `noise` over `steps` evenly spaced
  timesteps; returns images in [-1, 1]."""
  timesteps = alpha_bars.shape[0]
  ts = jnp.linspace(timesteps - 1, 0, steps).round().astype(jnp.int32)
  prev = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])

  def step(x, t_and_prev):
    t, t_prev = t_and_prev
    a = alpha_bars[t]
    a_prev = jnp.where(t_prev >= 0, alpha_bars[jnp.maximum(t_prev, 0)], 1.0)
    eps = predict(x, jnp.full((x.shape[0],), t))
    x0 = jnp.clip((x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a), -1.0, 1.0)
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)  # consistent with x0
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps, None

  x, _ = jax.lax.scan(step, noise, (ts, prev))
  return x
