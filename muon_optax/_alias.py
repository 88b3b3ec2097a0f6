"""`muon` and `normuon`: Muon (or NorMuon) for the weight matrices, AdamW
for everything else."""

from collections.abc import Callable
import math
from typing import Any

import jax
import optax

from muon_optax import _binding
from muon_optax import _checks
from muon_optax import _diagnostics
from muon_optax import _newton_schulz
from muon_optax import _normuon
from muon_optax import _paths
from muon_optax import _transform
from muon_optax._coeffs import NsCoeffs
from muon_optax._routing import ADAM
from muon_optax._routing import MUON


def _mask_fn(mask: Any) -> Any:
  """A weight-decay mask that also fits the partitioned (masked) tree."""
  if mask is None or callable(mask):
    return mask

  def mask_for(tree):
    lookup = _paths.PathLookup(mask)
    return _paths.map_with_paths(lambda p, _: bool(lookup.get(p, True)), tree)

  return mask_for


def _with_adam(
  muon_steps: Callable[[_binding.MatrixViews], list[Any]],
  *,
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: jax.typing.ArrayLike,
  weight_decay_mask: Any,
  mu_dtype: jax.typing.DTypeLike | None,
  consistent_rms: jax.typing.ArrayLike | str | None,
  adam_learning_rate: optax.ScalarOrSchedule | None,
  adam_b1: jax.typing.ArrayLike,
  adam_b2: jax.typing.ArrayLike,
  adam_eps: jax.typing.ArrayLike,
  adam_eps_root: jax.typing.ArrayLike,
  adam_weight_decay: jax.typing.ArrayLike,
  adam_nesterov: bool,
  param_labels: Any,
  matrix_views: _binding.MatrixViews,
  diagnostics: bool,
) -> optax.GradientTransformation:
  """The partition of `muon` and `normuon`: `muon_steps(views)` (what turns a
  gradient into an orthogonalized direction), then the shape scaling, the
  weight decay and the learning rate on the Muon leaves; AdamW on the rest.
  """
  _binding.check_labels_arg(param_labels)
  _binding.check_views_arg(matrix_views)
  given = _binding.as_routing(param_labels)  # a Routing, or a model's
  if given is not None:
    param_labels = given
    if matrix_views is None:
      matrix_views = given
  muon_tx = optax.chain(
    *muon_steps(matrix_views),
    _transform.scale_by_shape(matrix_views, consistent_rms),
    optax.add_decayed_weights(weight_decay, _mask_fn(weight_decay_mask)),
    optax.scale_by_learning_rate(learning_rate),
  )
  adam_tx = optax.adamw(
    learning_rate=(
      learning_rate if adam_learning_rate is None else adam_learning_rate
    ),
    b1=adam_b1,
    b2=adam_b2,
    eps=adam_eps,
    eps_root=adam_eps_root,
    weight_decay=adam_weight_decay,
    mu_dtype=mu_dtype,
    nesterov=adam_nesterov,
  )
  tx = optax.partition(
    {MUON: muon_tx, ADAM: adam_tx},
    _binding.label_fn(param_labels, matrix_views),
  )
  if diagnostics:
    tx = optax.chain(tx, _diagnostics.record_update_stats())
  return tx


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
  bias_correction: bool = False,
  consistent_rms: jax.typing.ArrayLike | str | None = 0.2,
  compute_dtype: jax.typing.DTypeLike | None = None,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  adam_b1: jax.typing.ArrayLike = 0.9,
  adam_b2: jax.typing.ArrayLike = 0.999,
  adam_eps: jax.typing.ArrayLike = 1e-8,
  adam_eps_root: jax.typing.ArrayLike = 0.0,
  adam_weight_decay: jax.typing.ArrayLike = 0.0,
  adam_nesterov: bool = False,
  param_labels: Any = None,
  matrix_views: _binding.MatrixViews = None,
  group_strategy: str = 'auto',
  diagnostics: bool = False,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> optax.GradientTransformation:
  r"""Muon for weight matrices (conv kernels included), AdamW for the rest.

  An `optax.partition` of two transformations:

  - `'muon'`: `scale_by_muon` → `scale_by_shape` → decoupled weight decay →
    learning rate, i.e. :math:`W \leftarrow W (1 - \eta \lambda) - \eta\,
    s\, O` (optax.contrib.muon's chain);
  - `'adam'`: `optax.adamw` with its own `adam_eps`.

  Which leaf goes where is `param_labels`: by default `muon_optax.route` of
  the params (every weight matrix and every convolution kernel to Muon;
  biases, norms, embeddings, the output head and degenerate kernels to
  Adam). `muon_optax.trace_routing` reads it from the model's computation
  instead, which needs no names.

  The positional arguments are optax.contrib.muon's, in its order; the rest
  are keyword-only. These defaults differ from optax.contrib.muon 0.2.8's,
  on purpose (docs/migration.md lists them, and a test keeps the list true):

  - `ns_coeffs='polar_express'` (optax: `'standard'`, KellerJordan's
    quintic): closer to the polar factor in the same 5 steps;
  - `eps=1e-7` (optax: 1e-8, shared with Adam) and `adam_eps=1e-8`: the
    Newton–Schulz scaling and Adam's denominator have their own;
  - `consistent_rms=0.2` (optax: None): one learning rate serves the Muon
    and Adam parts, and AdamW's carries over;
  - `bias_correction=False` (optax corrects): KellerJordan's momentum;
  - `adam_nesterov=False` (optax passes `nesterov` to its Adam too): plain
    AdamW for the rest;
  - the routing above (optax: every 2-D leaf to Muon).

  `muon(lr, 'standard', 5, 0.95, 1e-8, adam_eps=1e-8, consistent_rms=None,
  bias_correction=True, adam_nesterov=True, param_labels=two_d)`, with
  `two_d` labelling the 2-D leaves `'muon'`, gives optax.contrib.muon's
  updates. With `optax.inject_hyperparams(muon)` every numeric argument can
  be injected; the arguments that shape the compiled program (`ns_steps`,
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
    bias_correction: Adam-style bias correction of the Muon momentum,
      optax.contrib's form (see `scale_by_muon`).
    consistent_rms: the update RMS factor of `scale_by_shape` (0.2: AdamW's
      RMS), None for width scaling
      :math:`\sqrt{\max(1, \text{fan\_out}/\text{fan\_in})}` (which wants
      a larger learning rate than Adam's, see `adam_learning_rate`), or
      `'keller_jordan'` for KellerJordan/Muon's factor on PyTorch layouts
      (see `scale_by_shape`).
    compute_dtype: dtype of the Newton–Schulz matmul operands.
    adam_learning_rate: the Adam part's learning rate; None uses
      `learning_rate`.
    adam_b1: Adam's first-moment decay.
    adam_b2: Adam's second-moment decay.
    adam_eps: Adam's epsilon.
    adam_eps_root: Adam's epsilon inside the square root.
    adam_weight_decay: Adam's decoupled weight decay.
    adam_nesterov: Nesterov momentum in the Adam part (NAdamW).
    param_labels: a `Routing` (`muon_optax.route`, `trace_routing`; its views
      are used too), a Flax NNX or Equinox module (its `route`), a tree (or
      prefix tree) of `'muon'`/`'adam'` matched by path, a callable from
      params to one, or None for `route(params)`. Under
      `optax.inject_hyperparams` pass a `Routing` or a label tree: optax
      calls callables (and modules) with the step count.
    matrix_views: see `scale_by_muon`; None takes the views from the module
      or `Routing` when `param_labels` is one, else where `route(params)`
      reads them (an Equinox module's layer types, or shapes and names). A
      `param_labels` function gives labels only: its views are checked
      against these at `init`.
    group_strategy: see `scale_by_muon`.
    diagnostics: record per-leaf metrics every step (Muon's orthogonality
      error, momentum norm, and every leaf's applied update RMS and its ratio
      to the weight RMS), read with `muon_optax.diagnostics(state)`. The
      metrics live in the state, which gains their entries: a flag that
      changes what is computed changes the state's structure, so turn it on
      from the start (a checkpoint of one does not restore into the other).
      Off, nothing is computed or stored.
    mesh: the device mesh to split Muon's Newton–Schulz work over; None uses
      the ambient mesh (`jax.set_mesh`), else the updates' (explicit axes).
      See `scale_by_muon`.

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

  def muon_steps(views):
    return [
      _transform.scale_by_muon(
        ns_coeffs,
        ns_steps,
        beta,
        eps,
        mu_dtype,
        nesterov=nesterov,
        adaptive=adaptive,
        preconditioning=preconditioning,
        bias_correction=bias_correction,
        compute_dtype=compute_dtype,
        matrix_views=views,
        group_strategy=group_strategy,
        diagnostics=diagnostics,
        mesh=mesh,
      ),
    ]

  return _with_adam(
    muon_steps,
    learning_rate=learning_rate,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    mu_dtype=mu_dtype,
    consistent_rms=consistent_rms,
    adam_learning_rate=adam_learning_rate,
    adam_b1=adam_b1,
    adam_b2=adam_b2,
    adam_eps=adam_eps,
    adam_eps_root=adam_eps_root,
    adam_weight_decay=adam_weight_decay,
    adam_nesterov=adam_nesterov,
    param_labels=param_labels,
    matrix_views=matrix_views,
    diagnostics=diagnostics,
  )


def normuon(
  learning_rate: optax.ScalarOrSchedule,
  ns_coeffs: NsCoeffs = 'polar_express',
  ns_steps: int | None = None,
  beta: jax.typing.ArrayLike = 0.95,
  eps: jax.typing.ArrayLike = _newton_schulz.DEFAULT_EPS,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: Any = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  *,
  b2: jax.typing.ArrayLike = _normuon.DEFAULT_B2,
  normuon_eps: jax.typing.ArrayLike = _normuon.DEFAULT_EPS,
  nesterov: bool = True,
  adaptive: bool = False,
  preconditioning: str = 'frobenius',
  bias_correction: bool = False,
  consistent_rms: jax.typing.ArrayLike | str | None = 0.2,
  compute_dtype: jax.typing.DTypeLike | None = None,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  adam_b1: jax.typing.ArrayLike = 0.9,
  adam_b2: jax.typing.ArrayLike = 0.999,
  adam_eps: jax.typing.ArrayLike = 1e-8,
  adam_eps_root: jax.typing.ArrayLike = 0.0,
  adam_weight_decay: jax.typing.ArrayLike = 0.0,
  adam_nesterov: bool = False,
  param_labels: Any = None,
  matrix_views: _binding.MatrixViews = None,
  group_strategy: str = 'auto',
  diagnostics: bool = False,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> optax.GradientTransformation:
  r"""NorMuon for weight matrices, AdamW for the rest: `muon` plus NorMuon.

  `muon`'s partition with `scale_by_normuon` between `scale_by_muon` and
  `scale_by_shape`: each output neuron of the orthogonalized update is
  divided by the root of its second moment (an exponential average, decay
  `b2`, of its mean square), and the matrix is then rescaled to the
  Newton–Schulz output's Frobenius norm, so `consistent_rms`, the learning
  rate and the weight decay mean what they mean in `muon`.

  Every argument but the two below is `muon`'s, in the same places; see
  `muon` for them. `optax.inject_hyperparams(normuon)` injects `b2` and
  `normuon_eps` too.

  Args:
    learning_rate: the learning rate, a scalar or an optax schedule.
    b2: decay of the neurons' second moment, in [0, 1] (0.95, as in the
      paper and microsoft/dion).
    normuon_eps: added to the second moment under the square root (apart
      from `eps`, Newton–Schulz's).

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import muon_optax
    >>> params = {'conv': {'kernel': jnp.ones((3, 3, 8, 16)),
    ...                    'bias': jnp.zeros(16)}}
    >>> tx = muon_optax.normuon(learning_rate=1e-3, b2=0.95)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.
  """
  _checks.check_scalar(normuon_eps, 'normuon_eps', low=0.0, high=math.inf)

  def muon_steps(views):
    return [
      _transform.scale_by_muon(
        ns_coeffs,
        ns_steps,
        beta,
        eps,
        mu_dtype,
        nesterov=nesterov,
        adaptive=adaptive,
        preconditioning=preconditioning,
        bias_correction=bias_correction,
        compute_dtype=compute_dtype,
        matrix_views=views,
        group_strategy=group_strategy,
        diagnostics=diagnostics,
        mesh=mesh,
      ),
      _normuon.scale_by_normuon(b2, normuon_eps, matrix_views=views, mesh=mesh),
    ]

  return _with_adam(
    muon_steps,
    learning_rate=learning_rate,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    mu_dtype=mu_dtype,
    consistent_rms=consistent_rms,
    adam_learning_rate=adam_learning_rate,
    adam_b1=adam_b1,
    adam_b2=adam_b2,
    adam_eps=adam_eps,
    adam_eps_root=adam_eps_root,
    adam_weight_decay=adam_weight_decay,
    adam_nesterov=adam_nesterov,
    param_labels=param_labels,
    matrix_views=matrix_views,
    diagnostics=diagnostics,
  )
