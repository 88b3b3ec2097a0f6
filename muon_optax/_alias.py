"""`muon`: Muon for the weight matrices, AdamW for everything else."""

from collections.abc import Callable
from typing import Any

import jax
import optax

from muon_optax import _diagnostics
from muon_optax import _newton_schulz
from muon_optax import _paths
from muon_optax import _routing
from muon_optax import _transform
from muon_optax._coeffs import NsCoeffs

ParamLabels = Any | Callable[[optax.Params], Any] | None


def _label_fn(param_labels: ParamLabels) -> Callable[[Any], Any]:
  """A function from any params tree to its label tree, matched by path."""
  if _routing._is_module(param_labels):  # pylint: disable=protected-access
    param_labels = _routing.param_labels(param_labels)

  def labels_for(params):
    if param_labels is None:
      rules = _routing.route(params)
      return _paths.map_with_paths(lambda p, _: rules[p][0], params)
    given = param_labels(params) if callable(param_labels) else param_labels
    lookup = _paths.PathLookup(given)

    def label(path, _):
      value = lookup.get(path)
      if value is None:
        raise ValueError(
          f'`param_labels` has no label for parameter {path!r}; the label '
          'tree must have the structure of the params (or be a prefix of it).'
        )
      if value not in _routing.LABELS:
        raise ValueError(
          f'`param_labels` gives parameter {path!r} the label {value!r}; the '
          f'labels are {list(_routing.LABELS)}.'
        )
      return value

    labels = _paths.map_with_paths(label, params)
    if lookup.unused():
      raise ValueError(
        '`param_labels` does not match the params: its entries '
        f'{lookup.unused()} name no parameter.'
      )
    return labels

  return labels_for


def _mask_fn(mask: Any) -> Any:
  """A weight-decay mask that also fits the partitioned (masked) tree."""
  if mask is None or callable(mask):
    return mask

  def mask_for(tree):
    lookup = _paths.PathLookup(mask)
    return _paths.map_with_paths(lambda p, _: bool(lookup.get(p, True)), tree)

  return mask_for


def muon(
  learning_rate: optax.ScalarOrSchedule,
  *,
  ns_coeffs: NsCoeffs = 'polar_express',
  ns_steps: int = 5,
  beta: jax.typing.ArrayLike = 0.95,
  nesterov: bool = True,
  scaling: str = 'rms',
  eps: float = _newton_schulz.DEFAULT_EPS,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: Any = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  compute_dtype: jax.typing.DTypeLike | None = None,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  adam_b1: jax.typing.ArrayLike = 0.9,
  adam_b2: jax.typing.ArrayLike = 0.999,
  adam_eps: jax.typing.ArrayLike = 1e-8,
  adam_weight_decay: jax.typing.ArrayLike = 0.0,
  param_labels: ParamLabels = None,
  matrix_views: _transform.MatrixViews = None,
  group_strategy: str = 'auto',
  diagnostics: bool = False,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> optax.GradientTransformation:
  r"""Muon for weight matrices (conv kernels included), AdamW for the rest.

  An `optax.partition` of two transformations:

  - `'muon'`: `scale_by_muon` → decoupled weight decay → learning rate, i.e.
    :math:`W \leftarrow W (1 - \eta \lambda) - \eta\, O`;
  - `'adam'`: plain `optax.adamw` with its own `adam_eps` (no hidden Nesterov
    and no shared `eps`, unlike optax.contrib.muon 0.2.8).

  Which leaf goes where is `param_labels`: by default the rules of
  `muon_optax.param_labels` (every weight matrix and every convolution kernel
  to Muon; biases, norms, embeddings, the output head and degenerate kernels
  to Adam).

  Args:
    learning_rate: Muon's learning rate, a scalar or an optax schedule.
    ns_coeffs: Newton–Schulz coefficients, see `orthogonalize`.
    ns_steps: number of Newton–Schulz steps.
    beta: momentum decay.
    nesterov: use the Nesterov look-ahead.
    scaling: `'rms'` (default), `'jordan'` or `'none'`, see `scale_by_muon`.
    eps: added to the Frobenius norm before Newton–Schulz.
    weight_decay: decoupled weight decay of the Muon leaves (multiplied by
      the learning rate, as in PyTorch and optax).
    weight_decay_mask: a tree (or prefix tree) of booleans, or a callable to
      one, restricting `weight_decay` among the Muon leaves.
    mu_dtype: dtype of the momenta (Muon and Adam); None keeps the params'.
    compute_dtype: dtype of the Newton–Schulz matmul operands.
    adam_learning_rate: the Adam part's learning rate; None uses
      `learning_rate`, which is right with `scaling='rms'` (the default) and
      too large with `'jordan'`.
    adam_b1: Adam's first-moment decay.
    adam_b2: Adam's second-moment decay.
    adam_eps: Adam's epsilon.
    adam_weight_decay: Adam's decoupled weight decay.
    param_labels: a tree (or prefix tree) of `'muon'`/`'adam'` matched by
      path, a callable from params to one, a Flax NNX module (its default
      rules, `muon_optax.param_labels(module)`), or None for the default rules
      applied to the params tree.
    matrix_views: see `scale_by_muon`; None takes the views from the module
      when `param_labels` is one, and from shapes and names otherwise.
    group_strategy: see `scale_by_muon`.
    diagnostics: record per-leaf metrics every step (Muon's orthogonality
      error, momentum norm, and every leaf's applied update RMS and its ratio
      to the weight RMS), read with `muon_optax.diagnostics(state)`. The
      state then gains a `record_update_stats` entry; off, nothing is
      computed.
    mesh: the device mesh to split Muon's Newton–Schulz work over; None uses
      the ambient mesh (`jax.set_mesh`), if any. See `scale_by_muon`.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import muon_optax
    >>> params = {'conv': {'kernel': jnp.ones((3, 3, 8, 16)),
    ...                    'bias': jnp.zeros(16)},
    ...           'head': {'kernel': jnp.ones((16, 10))}}
    >>> tx = muon_optax.muon(learning_rate=1e-3, weight_decay=0.1)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.

    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025.
  """
  if adam_learning_rate is None:
    adam_learning_rate = learning_rate
  if matrix_views is None and _routing._is_module(param_labels):  # pylint: disable=protected-access
    matrix_views = _routing.matrix_views(param_labels)
  muon_tx = optax.chain(
    _transform.scale_by_muon(
      beta=beta,
      nesterov=nesterov,
      ns_coeffs=ns_coeffs,
      ns_steps=ns_steps,
      scaling=scaling,
      eps=eps,
      mu_dtype=mu_dtype,
      compute_dtype=compute_dtype,
      matrix_views=matrix_views,
      group_strategy=group_strategy,
      diagnostics=diagnostics,
      mesh=mesh,
    ),
    optax.add_decayed_weights(weight_decay, _mask_fn(weight_decay_mask)),
    optax.scale_by_learning_rate(learning_rate),
  )
  adam_tx = optax.adamw(
    learning_rate=adam_learning_rate,
    b1=adam_b1,
    b2=adam_b2,
    eps=adam_eps,
    weight_decay=adam_weight_decay,
    mu_dtype=mu_dtype,
  )
  tx = optax.partition(
    {_routing.MUON: muon_tx, _routing.ADAM: adam_tx},
    _label_fn(param_labels),
  )
  if diagnostics:
    tx = optax.chain(tx, _diagnostics.record_update_stats())
  return tx
