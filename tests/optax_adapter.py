"""optax.contrib.muon's interface on top of muon_optax, for optax's own tests.

The adapter only translates: optax's routing rule (every 2-D leaf, or the
leaves `muon_weight_dimension_numbers` names, to Muon), its defaults
(KellerJordan's quintic, width scaling, a shared `eps`) and its argument
names. Every number comes from muon_optax.
"""

import types

import jax
import optax

import muon_optax

_DN = optax.contrib.MuonDimensionNumbers
_is_dn_leaf = lambda x: x is None or isinstance(x, _DN)


def _dims_tree(dims, params):
  """optax's dimension numbers broadcast to one entry per param leaf."""
  dims = dims(params) if callable(dims) else dims
  return jax.tree.map(
    lambda d, sub: jax.tree.map(lambda _: d, sub),
    dims,
    params,
    is_leaf=_is_dn_leaf,
  )


def muon(
  learning_rate: optax.ScalarOrSchedule,
  ns_coeffs=(3.4445, -4.7750, 2.0315),
  ns_steps=5,
  beta=0.95,
  eps=1e-8,
  weight_decay=0.0,
  weight_decay_mask=None,
  mu_dtype=None,
  *,
  nesterov=True,
  adaptive=False,
  preconditioning='frobenius',
  adam_b1=0.9,
  adam_b2=0.999,
  adam_eps_root=0.0,
  adam_weight_decay=0.0,
  adam_learning_rate=None,
  muon_weight_dimension_numbers=None,
  consistent_rms=None,
):
  """`optax.contrib.muon`'s signature and routing, muon_optax's update."""
  dims = muon_weight_dimension_numbers
  if dims is None:
    labels = lambda params: jax.tree.map(
      lambda x: 'muon' if x.ndim == 2 else 'adam', params
    )
    views = muon_optax.MatrixView.dense()
  else:
    labels = lambda params: jax.tree.map(
      lambda d: 'adam' if d is None else 'muon',
      _dims_tree(dims, params),
      is_leaf=_is_dn_leaf,
    )
    views = lambda params: _dims_tree(dims, params)
  return muon_optax.muon(
    learning_rate,
    ns_coeffs,
    ns_steps,
    beta,
    eps,
    weight_decay,
    weight_decay_mask,
    mu_dtype,
    nesterov=nesterov,
    adaptive=adaptive,
    preconditioning=preconditioning,
    consistent_rms=consistent_rms,
    adam_learning_rate=adam_learning_rate,
    adam_b1=adam_b1,
    adam_b2=adam_b2,
    adam_eps=eps,
    adam_eps_root=adam_eps_root,
    adam_weight_decay=adam_weight_decay,
    param_labels=labels,
    matrix_views=views,
  )


def orthogonalize_via_newton_schulz(
  x,
  ns_coeffs,
  ns_steps=5,
  preconditioning='frobenius',
  eps=1e-8,
  dimension_numbers=None,
):
  return muon_optax.orthogonalize(
    x,
    jax.device_get(ns_coeffs),
    int(ns_steps),
    preconditioning=preconditioning,
    eps=eps,
    matrix_views=dimension_numbers,  # optax's name for a view
  )


def _compute_muon_reshape(x, dim_nums):
  view = muon_optax.MatrixView(dim_nums.reduction_axis, dim_nums.output_axis)
  resolved = view.resolve(x.shape)
  return resolved.to_matrices, resolved.from_matrices


# Stands in for `optax.contrib._muon` inside optax's test modules.
module = types.SimpleNamespace(
  muon=muon,
  MuonDimensionNumbers=_DN,
  orthogonalize_via_newton_schulz=orthogonalize_via_newton_schulz,
  _compute_muon_reshape=_compute_muon_reshape,
)
