"""`muon`: Muon for the weight matrices, AdamW for everything else."""

from typing import Any

import jax
import optax

from muon_optax import _diagnostics
from muon_optax import _newton_schulz
from muon_optax import _paths
from muon_optax import _routing
from muon_optax import _transform
from muon_optax._coeffs import NsCoeffs


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
  ns_coeffs: NsCoeffs = 'polar_express',
  ns_steps: int | None = None,
  beta: jax.typing.ArrayLike = 0.95,
  eps: jax.typing.ArrayLike = _newton_schulz.DEFAULT_EPS,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: Any = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  *,
  nesterov: bool = True,
  adaptive: bool = False,
  preconditioning: str = 'frobenius',
  consistent_rms: jax.typing.ArrayLike | None = 0.2,
  compute_dtype: jax.typing.DTypeLike | None = None,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  adam_b1: jax.typing.ArrayLike = 0.9,
  adam_b2: jax.typing.ArrayLike = 0.999,
  adam_eps: jax.typing.ArrayLike = 1e-8,
  adam_eps_root: jax.typing.ArrayLike = 0.0,
  adam_weight_decay: jax.typing.ArrayLike = 0.0,
  param_labels: Any = None,
  matrix_views: _routing.MatrixViews = None,
  group_strategy: str = 'auto',
  diagnostics: bool = False,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> optax.GradientTransformation:
  r"""Muon for weight matrices (conv kernels included), AdamW for the rest.

  An `optax.partition` of two transformations:

  - `'muon'`: `scale_by_muon` → `scale_by_shape` → decoupled weight decay →
    learning rate, i.e. :math:`W \leftarrow W (1 - \eta \lambda) - \eta\,
    s\, O` (optax.contrib.muon's chain);
  - `'adam'`: plain `optax.adamw` with its own `adam_eps` (no hidden Nesterov
    and no shared `eps`, unlike optax.contrib.muon 0.2.8).

  Which leaf goes where is `param_labels`: by default the rules of
  `muon_optax.param_labels` (every weight matrix and every convolution kernel
  to Muon; biases, norms, embeddings, the output head and degenerate kernels
  to Adam). `muon_optax.trace_routing` reads it from the model's computation
  instead, which needs no names.

  The positional arguments are optax.contrib.muon's, in its order; the rest
  are keyword-only. It differs from optax.contrib.muon on purpose in three
  defaults: `ns_coeffs='polar_express'` (closer to the polar factor in the
  same 5 steps), `consistent_rms=0.2` (one learning rate serves the Muon
  and Adam parts, and AdamW's carries over) and the routing above. With
  `optax.inject_hyperparams(muon)` every numeric argument can be injected;
  the arguments that shape the compiled program (`ns_steps`,
  `preconditioning`, ...) default to values it leaves static.

  Args:
    learning_rate: the learning rate, a scalar or an optax schedule.
    ns_coeffs: Newton–Schulz coefficients, see `orthogonalize`.
    ns_steps: number of Newton–Schulz steps; None for the preset's (5).
    beta: momentum decay.
    eps: keeps the Newton–Schulz input scaling finite.
    weight_decay: decoupled weight decay of the Muon leaves (multiplied by
      the learning rate, as in PyTorch and optax).
    weight_decay_mask: a tree (or prefix tree) of booleans, or a callable to
      one, restricting `weight_decay` among the Muon leaves.
    mu_dtype: dtype of the momenta (Muon and Adam); None keeps the params'.
    nesterov: use the Nesterov look-ahead (Muon only).
    adaptive: scale each update by a nuclear-norm estimate, see
      `scale_by_muon`.
    preconditioning: `'frobenius'`, `'spectral'`, `'aol'` or `'schatten'`,
      see `orthogonalize`.
    consistent_rms: the update RMS factor of `scale_by_shape` (0.2: AdamW's
      RMS), or None for KellerJordan's width scaling
      :math:`\sqrt{\max(1, \text{fan\_out}/\text{fan\_in})}`, which wants
      a larger learning rate than Adam's (see `adam_learning_rate`).
    compute_dtype: dtype of the Newton–Schulz matmul operands.
    adam_learning_rate: the Adam part's learning rate; None uses
      `learning_rate`.
    adam_b1: Adam's first-moment decay.
    adam_b2: Adam's second-moment decay.
    adam_eps: Adam's epsilon.
    adam_eps_root: Adam's epsilon inside the square root.
    adam_weight_decay: Adam's decoupled weight decay.
    param_labels: a tree (or prefix tree) of `'muon'`/`'adam'` matched by
      path, a callable from params to one, a `Routing`
      (`muon_optax.trace_routing`; its views are used too), a Flax NNX
      module (its rules, `muon_optax.param_labels(module)`), or None for the
      default rules applied to the params tree.
    matrix_views: see `scale_by_muon`; None takes the views from the module
      or `Routing` when `param_labels` is one, and from shapes and names
      otherwise.
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
  if matrix_views is None and isinstance(param_labels, _routing.Routing):
    matrix_views = param_labels
  elif matrix_views is None and _routing.is_model(param_labels):
    matrix_views = _routing.routing(param_labels)
  muon_tx = optax.chain(
    _transform.scale_by_muon(
      ns_coeffs,
      ns_steps,
      beta,
      eps,
      mu_dtype,
      nesterov=nesterov,
      adaptive=adaptive,
      preconditioning=preconditioning,
      compute_dtype=compute_dtype,
      matrix_views=matrix_views,
      group_strategy=group_strategy,
      diagnostics=diagnostics,
      mesh=mesh,
    ),
    _transform.scale_by_shape(matrix_views, consistent_rms),
    optax.add_decayed_weights(weight_decay, _mask_fn(weight_decay_mask)),
    optax.scale_by_learning_rate(learning_rate),
  )
  adam_tx = optax.adamw(
    learning_rate=adam_learning_rate,
    b1=adam_b1,
    b2=adam_b2,
    eps=adam_eps,
    eps_root=adam_eps_root,
    weight_decay=adam_weight_decay,
    mu_dtype=mu_dtype,
  )
  tx = optax.partition(
    {_routing.MUON: muon_tx, _routing.ADAM: adam_tx},
    _routing.label_fn(param_labels),
  )
  if diagnostics:
    tx = optax.chain(tx, _diagnostics.record_update_stats())
  return tx
