"""`route`: the source that reads an object, finished into a `Routing`.

What an object is decides which source reads it: a `Routing` is finished
again, an NNX or Equinox module is read by its layer types, a Flax Linen
module is refused (it holds no parameters), and any other tree by names and
shapes.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import importlib
import sys
from typing import Any

import jax
import numpy as np

from muon_optax import _names
from muon_optax import _routing
from muon_optax._routing import EMBED_NAMES
from muon_optax._routing import HEAD_NAMES
from muon_optax._routing import Routing
from muon_optax._views import MatrixView

# Model libraries are optional: an object can only be one of theirs once the
# user has imported the library, so nothing is imported before that.


def _nnx() -> Any:
  """The NNX source (called once an object is an NNX module, so flax is
  loaded)."""
  return importlib.import_module('muon_optax._nnx')


def _eqx() -> Any:
  """The Equinox source (called once an object is an Equinox module)."""
  return importlib.import_module('muon_optax._equinox')


def is_nnx_module(x: Any) -> bool:
  nnx = sys.modules.get('flax.nnx')
  return nnx is not None and isinstance(x, nnx.Module)


def is_eqx_module(x: Any) -> bool:
  eqx = sys.modules.get('equinox')
  return eqx is not None and isinstance(x, eqx.Module)


def is_linen_module(x: Any) -> bool:
  linen = sys.modules.get('flax.linen')
  return linen is not None and isinstance(x, linen.Module)


LINEN_LINE = (
  "muon_optax.trace_routing(lambda p, s, x: model.apply({'params': p, "
  "'batch_stats': s}, x, train=True, mutable=['batch_stats']), params, "
  'batch_stats, x)'
)


def refuse_linen(x: Any, what: str) -> None:
  """A Linen module names no parameters: a TypeError that says what does."""
  if is_linen_module(x):
    raise TypeError(
      f'{what} is a Flax Linen module ({type(x).__name__}), which holds no '
      'parameters (they live in the variables `init` returned). Read the '
      'routing from its computation, e.g. for a model with BatchNorm '
      f'`{LINEN_LINE}`, or pass the params tree (`variables["params"]`).'
    )


def is_model(x: Any) -> bool:
  """A model object whose layer types route it: an NNX module, or an Equinox
  module whose leaves include arrays (an Equinox module holding labels or
  views is a label or view tree shaped like the model)."""
  if is_nnx_module(x):
    return True
  return is_eqx_module(x) and any(
    hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')
    for leaf in jax.tree.leaves(x)
  )


def refuse_schedule_value(x: Any, what: str) -> None:
  """A number or array where a tree was expected: what optax's
  `inject_hyperparams` passes after calling a function as a schedule."""
  if isinstance(x, (bool, int, float, complex, str, np.ndarray, jax.Array)):
    raise TypeError(
      f'{what} is {x!r}, not a tree. If it came through '
      '`optax.inject_hyperparams`, optax called your function (or model) '
      'with the step count, taking it for a schedule: pass a `Routing` '
      'instead (`muon_optax.route(model_or_params)` or '
      '`muon_optax.trace_routing(...)`), which is plain data and stays '
      'static, or list the argument in `static_args`.'
    )


def route(
  params_or_module: Any,
  *,
  overrides: Mapping[str, str] | None = None,
  view_overrides: Mapping[str, MatrixView] | None = None,
  head: str | None = None,
  stacked: Sequence[str] = (),
  head_names: Sequence[str] = HEAD_NAMES,
  embed_names: Sequence[str] = EMBED_NAMES,
  min_side: int | None = None,
  max_aspect: float | None = None,
) -> Routing:
  """Which parameters get Muon, through which view, and why: a `Routing`.

  The source is what `params_or_module` is:

  - a `Routing` (`trace_routing`'s, or an earlier `route`'s): its source's
    decisions, finished again with the options it was made with, updated by
    the ones given here;
  - a Flax NNX module: its layer types (a `Conv` kernel is a conv whatever
    its name; an `Embed` is an embedding; a `LinearGeneral` kernel's head
    axes are its view's);
  - an Equinox module: its layer types, PyTorch layouts (`Linear.weight` is
    `(out, in)`); the head is the layer named as one, else its last layer;
  - any other tree (Linen params, dicts, an NNX State, Haiku params,
    PyTorch-style state dicts): names and shapes.

  Rules, first match wins:

  1. `overrides`: `{pattern: label}`; a pattern is an fnmatch pattern on the
     '/'-joined path (`'blocks/*/mlp/*'`) or, without '/', on any one path
     component (`'stem'`, `'Conv_0'`). A pattern that matches nothing is an
     error.
  2. Leaves with fewer than two axes (biases, norm scales, scalars), and
     parameters named `bias` / `scale`: Adam.
  3. Embedding tables (an `nnx.Embed` / `eqx.nn.Embedding`, or a path
     component matching `embed_names`): Adam.
  4. The output head (a layer whose name matches `head_names`; an Equinox
     model's last layer; for a trace, the matmul nearest the output):
     where `head` says, Adam by default.
  5. Depthwise convolutions, and degenerate matrices (a side under
     `min_side` or an aspect ratio over `max_aspect`, timm's rule): Adam.
  6. Every other kernel, through its matrix view: Muon. That includes every
     convolution kernel, viewed as a `(prod(spatial) * in, out)` matrix.

  Names and shapes cannot know the layout of a 3+-axis leaf whose name says
  nothing (an einsum kernel, a stacked layer): those views are guessed (the
  conv layout), marked `guessed` in `describe`, and warned about. Declare
  stacked subtrees with `stacked`, give `view_overrides`, or trace.

  Args:
    params_or_module: a params tree, an NNX or Equinox module, or a
      `Routing`. A Flax Linen module is refused: it holds no parameters.
    overrides: `{pattern: 'muon' | 'adam'}`, applied last.
    view_overrides: `{pattern: MatrixView}`, applied first.
    head: `'adam'` (default) or `'muon'`: where the output head goes.
    stacked: plain trees only: patterns of subtrees whose leaves carry a
      leading layer axis (Linen `nn.scan`), which becomes a batch axis.
    head_names: fnmatch patterns (case-insensitive) naming output heads.
    embed_names: fnmatch patterns (case-insensitive) naming embeddings.
    min_side: matrices with a side shorter than this go to Adam (4).
    max_aspect: matrices with a longer-to-shorter side ratio above this go
      to Adam (128).

  Returns:
    A `Routing`; `.labels` and `.views` have the params' structure (for an
    NNX module, that of `nnx.state(module, nnx.Param)`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import muon_optax
    >>> params = {'Conv_0': {'kernel': jnp.zeros((3, 3, 16, 32)),
    ...                      'bias': jnp.zeros(32)},
    ...           'head': {'kernel': jnp.zeros((32, 10))}}
    >>> muon_optax.route(params).labels
    {'Conv_0': {'bias': 'adam', 'kernel': 'muon'}, 'head': {'kernel': 'adam'}}
    >>> muon_optax.route(params, head='muon').labels['head']
    {'kernel': 'muon'}
  """
  options = {
    'overrides': overrides,
    'view_overrides': view_overrides,
    'head': head,
    'min_side': min_side,
    'max_aspect': max_aspect,
  }
  options = {k: v for k, v in options.items() if v is not None}
  # One name is a 1-tuple (tuple('head') would be its characters).
  stacked, head_names, embed_names = (
    (x,) if isinstance(x, str) else x
    for x in (stacked, head_names, embed_names)
  )
  source_options = {
    'stacked': tuple(stacked),
    'head_names': tuple(head_names),
    'embed_names': tuple(embed_names),
  }
  if isinstance(params_or_module, Routing):
    changed = [
      k
      for k, v in source_options.items()
      if v != {'stacked': (), 'head_names': HEAD_NAMES}.get(k, EMBED_NAMES)
    ]
    if changed:
      raise ValueError(
        f'{changed} choose how a model or tree is read; a Routing was read '
        'already. Pass the model or params to `route` instead.'
      )
    return _routing.refinish(params_or_module, **options)
  return _routing.finish(
    source_of(params_or_module, **source_options), **options
  )


def source_of(params_or_module: Any, **source_options: Any) -> _routing.Source:
  """The decisions of whichever source reads `params_or_module`."""
  refuse_linen(params_or_module, 'The object to route')
  if is_model(params_or_module):
    if source_options.get('stacked'):
      raise ValueError(
        '`stacked` is for plain trees; a model object shows stacked layers '
        'by their shapes (the leading axes a layer does not own are a batch).'
      )
    if is_nnx_module(params_or_module):
      return _nnx().source(params_or_module, **source_options)
    return _eqx().source(params_or_module, **source_options)
  refuse_schedule_value(params_or_module, 'The params to route')
  return _names.source(params_or_module, **source_options)
