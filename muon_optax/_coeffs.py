"""Newton–Schulz coefficient presets and their resolution to a step list."""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

Triple = tuple[float, float, float]

# KellerJordan/Muon: one quintic, maximal slope at zero, used at every step.
JORDAN: tuple[Triple, ...] = ((3.4445, -4.7750, 2.0315),)

# Amsel et al. (arXiv 2505.16932), Algorithm 1: one optimal triple per step.
_POLAR_EXPRESS_RAW: tuple[Triple, ...] = (
  (8.28721201814563, -23.595886519098837, 17.300387312530933),
  (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
  (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
  (3.3184196573706015, -2.488488024314874, 0.51004894012372),
  (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
  (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
  (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
  (1.875, -1.25, 0.375),
)
# The paper's safety factor: every triple but the last is damped so that
# round-off cannot push a singular value past the polynomial's stable range,
# and the input is normalized by 1.01 times its Frobenius norm.
_SAFETY = 1.01
POLAR_EXPRESS: tuple[Triple, ...] = tuple(
  (a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5)
  for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

# microsoft/dion's 5-step list (optax.contrib's 'dion' preset).
DION: tuple[Triple, ...] = (
  (4.0848, -6.8946, 2.9270),
  (3.9505, -6.3029, 2.6377),
  (3.7418, -5.5913, 2.3037),
  (2.8769, -3.1427, 1.2046),
  (2.8366, -3.0525, 1.2012),
)


class Preset(NamedTuple):
  coeffs: tuple[Triple, ...]
  norm_scale: float  # X0 = X / (norm_scale * ||X||_F + eps)


PRESETS: dict[str, Preset] = {
  'jordan': Preset(JORDAN, 1.0),
  # optax.contrib's name for the same quintic.
  'standard': Preset(JORDAN, 1.0),
  'polar_express': Preset(POLAR_EXPRESS, _SAFETY),
  'dion': Preset(DION, 1.0),
}

NsCoeffs = str | Sequence[float] | Sequence[Sequence[float]] | np.ndarray


class NewtonSchulzPlan(NamedTuple):
  """The static schedule of one orthogonalization: a triple per step."""

  steps: tuple[Triple, ...]
  norm_scale: float


DEFAULT_NS_STEPS = 5


def resolve_ns_coeffs(
  ns_coeffs: NsCoeffs, ns_steps: int | None = None
) -> NewtonSchulzPlan:
  """Turns a preset name or coefficient array into one triple per step.

  With `n` triples for `ns_steps` steps: the first `ns_steps` are used when
  `n >= ns_steps`, and the last triple is repeated when `n < ns_steps`.
  `ns_steps=None` means 5 for a preset or a single triple, and `n` for an
  `(n, 3)` array. Coefficients become Python floats, so they are
  compile-time constants and never live in the optimizer state.

  Raises:
    ValueError: for an unknown preset, an array that is not of shape (3,) or
      (n, 3), non-finite coefficients, or `ns_steps` below 1.
    TypeError: for `ns_steps` that is not a Python int (an array, say: the
      number of steps shapes the compiled program, so it cannot be traced).
  """
  if ns_steps is not None and (
    isinstance(ns_steps, bool) or not isinstance(ns_steps, (int, np.integer))
  ):
    raise TypeError(
      f'`ns_steps` must be a Python int or None, got {ns_steps!r} of type '
      f'{type(ns_steps).__name__}. It shapes the compiled program: with '
      'optax.inject_hyperparams, leave it at None or list it in static_args.'
    )
  if ns_steps is not None and ns_steps < 1:
    raise ValueError(f'`ns_steps` must be at least 1, got {ns_steps=}.')
  if isinstance(ns_coeffs, str):
    if ns_coeffs not in PRESETS:
      raise ValueError(
        f'Unknown `ns_coeffs` preset {ns_coeffs!r}; the presets are '
        f'{sorted(PRESETS)}, or pass an array of shape (3,) or (n, 3).'
      )
    triples, norm_scale = PRESETS[ns_coeffs]
    default_steps = DEFAULT_NS_STEPS
  else:
    try:
      arr = np.asarray(ns_coeffs, dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise TypeError(
        '`ns_coeffs` must be a preset name or an array of shape (3,) or '
        f'(n, 3), got {ns_coeffs!r}.'
      ) from e
    default_steps = DEFAULT_NS_STEPS if arr.ndim == 1 else len(arr)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != 3:
      raise ValueError(
        '`ns_coeffs` must have shape (3,) or (n, 3) with n >= 1, got shape '
        f'{np.shape(ns_coeffs)}.'
      )
    if not np.all(np.isfinite(arr)):
      raise ValueError(f'`ns_coeffs` must be finite, got {arr.tolist()}.')
    triples = tuple(tuple(float(v) for v in row) for row in arr)
    norm_scale = 1.0
  steps = default_steps if ns_steps is None else int(ns_steps)
  if len(triples) >= steps:
    chosen = triples[:steps]
  else:
    chosen = triples + (triples[-1],) * (steps - len(triples))
  return NewtonSchulzPlan(tuple(chosen), norm_scale)
