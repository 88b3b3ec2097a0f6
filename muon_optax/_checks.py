"""Argument checks shared by the transformations, run outside traced code.

Every check raises a `TypeError` or `ValueError` that names the argument and
what is allowed. Hyperparameters that `optax.inject_hyperparams` may hand over
as arrays (`beta`, `eps`, ...) are checked when they are concrete and passed
through when they are traced.
"""

from collections.abc import Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _concrete_float(value: Any) -> float | None:
  """`value` as a float when it is a concrete scalar, None when traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def check_scalar(value: Any, name: str, *, low: float, high: float) -> None:
  """Raises unless `value` is a real scalar in [low, high] (or traced)."""
  if isinstance(value, (str, bytes, bool)) or np.ndim(value) != 0:
    raise TypeError(f'`{name}` must be a real scalar, got {value!r}.')
  v = _concrete_float(value)
  if v is None:
    if isinstance(value, jax.core.Tracer):
      return
    raise TypeError(f'`{name}` must be a real scalar, got {value!r}.')
  if not (math.isfinite(v) and low <= v <= high):
    raise ValueError(
      f'`{name}` must be in [{low:g}, {high:g}], got {name}={value!r}.'
    )


def check_eps(eps: Any) -> None:
  """Raises unless `eps` is a finite scalar >= 0 (or a traced scalar)."""
  check_scalar(eps, 'eps', low=0.0, high=math.inf)


def check_choice(value: Any, name: str, allowed: Sequence[str]) -> None:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f'Unknown `{name}` {value!r}; allowed: {list(allowed)}.')


def float_dtype(value: Any, name: str) -> np.dtype | None:
  """`value` as a floating NumPy dtype (None stays None), or a TypeError."""
  if value is None:
    return None
  try:
    dt = np.dtype(value)
  except TypeError as e:
    raise TypeError(
      f'`{name}` must be a floating dtype or None, got {value!r}.'
    ) from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
      f'`{name}` must be a floating dtype (e.g. jnp.bfloat16 or jnp.float32) '
      f'or None, got {dt}.'
    )
  return dt


def check_matrix_input(x: Any, what: str = '`x`') -> None:
  """Raises unless `x` is a floating or complex array with >= 2 axes."""
  shape = np.shape(x)
  dtype = getattr(x, 'dtype', None) or np.asarray(x).dtype
  if len(shape) < 2:
    raise ValueError(
      f'{what} must have at least 2 axes (the last two are the matrix), '
      f'got shape {shape}.'
    )
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      f'{what} must be a floating or complex array, got dtype {dtype}.'
    )
