"""Plain float64 NumPy references the tests compare against.

Written from the algorithm's description (KellerJordan/Muon's form, see
REFERENCES), independently of muon_optax's JAX code: explicit transposes, no
folding of coefficients, no grouping.
"""

import numpy as np

JORDAN = (3.4445, -4.7750, 2.0315)
JORDAN_STEPS = (JORDAN,) * 5


def polar_factor(x: np.ndarray) -> np.ndarray:
  """The exact U Vᴴ of each matrix in the last two axes, by SVD."""
  dtype = np.complex128 if np.iscomplexobj(x) else np.float64
  u, _, vt = np.linalg.svd(np.asarray(x, dtype), full_matrices=False)
  return u @ vt


def newton_schulz(
  g, coeffs, eps=1e-7, norm_scale=1.0, preconditioning='frobenius'
):
  """Newton–Schulz on one matrix, as in KellerJordan/Muon, in float64.

  Complex inputs use the conjugate transpose (complex128). The
  preconditionings follow optax.contrib's descriptions: 'spectral' divides
  by the top singular value (here from an SVD), 'aol' scales rows by
  (sum_j |A_ij|)^(-1/2) with A = X Xᴴ, 'schatten' divides by
  sqrt(||X Xᴴ||_F).
  """
  dtype = np.complex128 if np.iscomplexobj(g) else np.float64
  x = np.asarray(g, dtype)
  transposed = x.shape[0] > x.shape[1]
  if transposed:
    x = x.T
  if preconditioning == 'frobenius':
    x = x / (norm_scale * np.linalg.norm(x) + eps)
  elif preconditioning == 'spectral':
    x = x / (norm_scale * np.linalg.svd(x, compute_uv=False)[0] + eps)
  elif preconditioning == 'aol':
    rows = np.maximum(np.abs(x @ x.conj().T).sum(axis=1), eps)
    x = x / np.sqrt(rows)[:, None] / norm_scale
  elif preconditioning == 'schatten':
    fro = max(np.linalg.norm(x @ x.conj().T), eps)
    x = x / np.sqrt(fro) / norm_scale
  else:
    raise ValueError(preconditioning)
  for a, b, c in coeffs:
    A = x @ x.conj().T
    B = b * A + c * A @ A
    x = a * x + B @ x
  return x.T if transposed else x


class NumpyMuon:
  """Muon on a dict of arrays: 2-D kernels and (…, in, out) conv kernels."""

  def __init__(
    self,
    lr,
    beta=0.95,
    nesterov=True,
    weight_decay=0.0,
    coeffs=(JORDAN,) * 5,
    scaling='jordan',
    eps=1e-7,
  ):
    self.lr, self.beta, self.nesterov = lr, beta, nesterov
    self.wd, self.coeffs, self.scaling, self.eps = (
      weight_decay,
      coeffs,
      scaling,
      eps,
    )
    self.momentum = {}

  def step(self, params, grads):
    new = {}
    for k, w in params.items():
      g = np.asarray(grads[k], np.float64)
      m = self.momentum.get(k, np.zeros_like(g))
      m = self.beta * m + (1 - self.beta) * g
      self.momentum[k] = m
      u = (1 - self.beta) * g + self.beta * m if self.nesterov else m
      mat = u.reshape(-1, u.shape[-1])  # (prod(spatial) * in, out)
      fan_in, fan_out = mat.shape
      o = newton_schulz(mat, self.coeffs, self.eps)
      if self.scaling == 'jordan':
        o = o * np.sqrt(max(1.0, fan_out / fan_in))
      elif self.scaling == 'rms':
        o = o * 0.2 * np.sqrt(max(fan_in, fan_out))
      w = np.asarray(w, np.float64)
      new[k] = w * (1 - self.lr * self.wd) - self.lr * o.reshape(w.shape)
    return new
