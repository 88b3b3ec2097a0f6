"""Per-layer metrics of an update: pure array maths, by name."""

import jax
import jax.numpy as jnp

# Per-leaf metrics are dicts keyed by the parameter path; the names below are
# the keys of each leaf's dict.
ORTHOGONALITY_ERROR = 'orthogonality_error'
MOMENTUM_NORM = 'momentum_norm'
UPDATE_RMS = 'update_rms'
UPDATE_TO_WEIGHT = 'update_to_weight_rms'
MUON_METRICS = (ORTHOGONALITY_ERROR, MOMENTUM_NORM, UPDATE_RMS)
UPDATE_METRICS = (UPDATE_RMS, UPDATE_TO_WEIGHT)


def orthogonality_error(o: jax.typing.ArrayLike) -> jax.Array:
  r""":math:`\|O O^H - I\|_F / \sqrt{k}` on the short side, batch-averaged.

  `o` is a matrix `(m, n)` or a batch `(..., m, n)` (the last two axes are
  the matrix); `k = min(m, n)`. 0 for an exact polar factor; about 0.1–0.3
  after 5 Newton–Schulz steps (the singular values sit in a band around 1,
  see docs/index.md); 1 for a zero matrix.

  Examples:
    >>> import jax.numpy as jnp
    >>> import muon_optax
    >>> float(muon_optax.orthogonality_error(jnp.eye(3, 5)))
    0.0
    >>> float(muon_optax.orthogonality_error(jnp.zeros((2, 4, 3))))
    1.0
  """
  o = jnp.asarray(o)
  if o.ndim < 2:
    raise ValueError(
      f'orthogonality_error needs a matrix or a batch of them, got shape '
      f'{o.shape}.'
    )
  m, n = o.shape[-2:]
  o = o.reshape(-1, m, n)
  if not jnp.issubdtype(o.dtype, jnp.complexfloating):
    o = o.astype(jnp.float32)
  if m > n:
    gram = jnp.einsum('bmi,bmj->bij', jnp.conj(o), o)
  else:
    gram = jnp.einsum('bim,bjm->bij', o, jnp.conj(o))
  k = min(m, n)
  err = jnp.sqrt(jnp.sum(jnp.abs(gram - jnp.eye(k)) ** 2, axis=(1, 2)) / k)
  return jnp.mean(err)


def rms(x: jax.typing.ArrayLike) -> jax.Array:
  """Root mean square of the entries' magnitudes, in float32."""
  return jnp.sqrt(jnp.mean(jnp.square(jnp.abs(jnp.asarray(x)))))


def norm(x: jax.typing.ArrayLike) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(jnp.abs(jnp.asarray(x)))))


def muon_metrics(o: jax.Array, momentum: jax.Array) -> dict[str, jax.Array]:
  """Metrics of one leaf's orthogonalized `(B, m, n)` update `o`."""
  return {
    ORTHOGONALITY_ERROR: orthogonality_error(o),
    MOMENTUM_NORM: norm(momentum).astype(jnp.float32),
    UPDATE_RMS: rms(o).astype(jnp.float32),
  }


def update_metrics(
  update: jax.Array, weight: jax.Array
) -> dict[str, jax.Array]:
  """The applied update's RMS and its ratio to the weight's RMS."""
  u = rms(update).astype(jnp.float32)
  w = rms(weight).astype(jnp.float32)
  return {UPDATE_RMS: u, UPDATE_TO_WEIGHT: u / jnp.maximum(w, 1e-12)}


def zeros(names: tuple[str, ...]) -> dict[str, jax.Array]:
  return {k: jnp.zeros([], jnp.float32) for k in names}
