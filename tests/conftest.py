"""Shared test helpers: random trees and arrays."""

import jax
import jax.numpy as jnp
import numpy as np

# Scripts that record fixtures need torch; they are run by hand, not tests.
collect_ignore = ['fixtures']


def random_like(params, step, seed=42):
  """A tree of standard normals shaped like `params`, one draw per `step`."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef,
    [
      jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves, strict=True)
    ],
  )


def normal(*shape, seed=0, dtype=jnp.float32):
  """A float array of standard normals from NumPy's generator."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)
