"""The Equinox source: what a module's parameters are, from its layer types.

Loaded only when equinox is (`muon_optax._route` asks for it when a user's
object is an Equinox module), so `import muon_optax` never imports equinox.

Equinox layers store PyTorch's layouts: `Linear.weight` is `(out, in)`, and
`Conv`'s and `ConvTranspose`'s weights are `(out, in // groups, *spatial)`
(`ConvTranspose` runs `lax.conv_general_dilated` with the same OIHW kernel
and a dilated input, so its fan-in is `in // groups * prod(spatial)` too).
The views use negative axes, so a stacked (vmapped) layer's leading axes
are a batch of matrices.

Layers: `Linear`, `Conv*` and `ConvTranspose*` weights are matrices
(depthwise ones, one input channel per group, are not); `GRUCell` and
`LSTMCell` weights are `(gates * hidden, in)` matrices; `Embedding` tables,
norms (`LayerNorm`, `RMSNorm`, `GroupNorm`, `BatchNorm`), `PReLU`,
`StateIndex` state and every bias are not; any other leaf keeps the
names-and-shapes decision.

The output head is found two ways:

- by name: every layer under a field whose name matches `head_names` (as the
  plain-tree rules do, so a named head never moves back to Muon);
- by position, when no field is named as a head: the output end of the
  model, read from field order (Equinox keeps declaration order). From the
  model, take its last field holding arrays; descend through `eqx.nn.MLP`
  (its `layers[-1]`), `eqx.nn.Sequential` and lists and tuples of layers
  (their last element holding arrays; not dicts, which are ordered by key);
  a `Linear`, `Conv` or `ConvTranspose` reached that way is the head. Any
  other module ends the search without a head: a custom block's last field
  (say a transformer block's MLP) is not the model's output. An
  `eqx.nn.MLP` that is the whole model, or its last field, therefore has
  its last layer as the head. Where declaration order is not call order,
  use `muon_optax.trace_routing` or an override.
"""

from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np

from muon_optax import _names
from muon_optax import _paths
from muon_optax import _routing
from muon_optax._routing import HEAD
from muon_optax._routing import MATRIX
from muon_optax._routing import OTHER
from muon_optax._routing import Decision
from muon_optax._views import MatrixView

# (out, in) and (out, in // groups, *spatial) as (fan_in, fan_out).
_OUT_IN = MatrixView((-1,), (-2,))
_CONV = (eqx.nn.Conv, eqx.nn.ConvTranspose)
_MATRIX_LAYERS = (eqx.nn.Linear, *_CONV)
_RECURRENT = (eqx.nn.GRUCell, eqx.nn.LSTMCell)
# Layers whose every array is a per-feature parameter or state: Adam.
_VECTOR_LAYERS = (
  eqx.nn.LayerNorm,
  eqx.nn.RMSNorm,
  eqx.nn.GroupNorm,
  eqx.nn.BatchNorm,
  eqx.nn.PReLU,
  eqx.nn.StateIndex,
)

KeyPath = tuple[Any, ...]


def is_module(x: Any) -> bool:
  return isinstance(x, eqx.Module)


def params(module: eqx.Module) -> Any:
  """The module's floating arrays, the tree `eqx.filter_grad` differentiates."""
  return eqx.filter(module, eqx.is_inexact_array)


def _children(module: Any) -> list[tuple[KeyPath, Any]]:
  """Arrays and submodules directly under `module` (through lists, dicts)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
    module, is_leaf=lambda x: x is not module and is_module(x)
  )
  return [(tuple(kp), x) for kp, x in flat]


def _modules(
  module: Any, prefix: KeyPath = ()
) -> Iterator[tuple[KeyPath, Any]]:
  """Every module in the tree with its key path, parents first."""
  yield prefix, module
  for kp, child in _children(module):
    if is_module(child):
      yield from _modules(child, prefix + kp)


def _has_arrays(x: Any) -> bool:
  return any(eqx.is_inexact_array(leaf) for leaf in jax.tree.leaves(x))


def _last_with_arrays(node: Any) -> tuple[KeyPath, Any] | None:
  found = [(kp, x) for kp, x in _children(node) if _has_arrays(x)]
  return found[-1] if found else None


def _output_layer(model: Any) -> tuple[KeyPath, Any, str] | None:
  """The layer at the model's output end: key path, layer, container.

  See the module docstring for the rule.
  """
  path: KeyPath = ()
  node, container = model, None
  while True:
    if isinstance(node, _MATRIX_LAYERS):
      return path, node, container or 'the model'
    if isinstance(node, eqx.nn.MLP):
      last = len(node.layers) - 1
      path += (
        jax.tree_util.GetAttrKey('layers'),
        jax.tree_util.SequenceKey(last),
      )
      node, container = node.layers[-1], 'MLP'
      continue
    if node is not model and not isinstance(node, eqx.nn.Sequential):
      return None
    last = _last_with_arrays(node)
    if last is None or not is_module(last[1]):
      return None
    if any(isinstance(k, jax.tree_util.DictKey) for k in last[0]):
      return None  # a dict's order is its keys', not the call order
    container = type(node).__name__ if node is not model else None
    path, node = path + last[0], last[1]


def _layer_decisions(
  layer: Any, leaves: list[tuple[str, str, tuple[int, ...]]]
) -> dict[str, Decision]:
  """Decisions for a known layer's own arrays: `(path, field, shape)` each."""
  kind = type(layer).__name__
  decisions = {}
  for path, field, shape in leaves:
    if isinstance(layer, _VECTOR_LAYERS):
      what = 'state' if isinstance(layer, eqx.nn.StateIndex) else field
      decisions[path] = Decision(OTHER, None, f'{what} ({kind})')
      continue
    if isinstance(layer, eqx.nn.Embedding):
      decisions[path] = Decision(OTHER, None, f'embedding ({kind})')
      continue
    is_weight = field == 'weight' or (
      isinstance(layer, _RECURRENT) and field in ('weight_ih', 'weight_hh')
    )
    if not is_weight:
      decisions[path] = Decision(OTHER, None, f'{field} ({kind})')
      continue
    if isinstance(layer, _CONV):
      own_ndim = layer.num_spatial_dims + 2
      view = _names.out_in_view(own_ndim)
      if layer.groups > 1 and layer.in_channels // layer.groups == 1:
        found = Decision(OTHER, view, f'depthwise conv ({kind})', conv=True)
      else:
        found = Decision(
          MATRIX, view, f'conv (out, in, *spatial) ({kind})', conv=True
        )
    else:
      own_ndim = 2
      why = 'linear' if isinstance(layer, eqx.nn.Linear) else 'recurrent'
      found = Decision(MATRIX, _OUT_IN, f'{why} ({kind})')
    if len(shape) < own_ndim:
      continue  # not the layout this layer makes: keep the names' decision
    decisions[path] = found
  return decisions


def source(
  module: eqx.Module,
  *,
  stacked: Sequence[str] = (),
  head_names: Sequence[str] = _routing.HEAD_NAMES,
  embed_names: Sequence[str] = _routing.EMBED_NAMES,
) -> _routing.Source:
  """The names-and-shapes decisions, refined by the layer types."""
  del stacked  # a module shows stacked layers by its shapes
  base = _names.source(
    params(module), head_names=head_names, embed_names=embed_names
  )
  decisions = dict(base.decisions)
  known = (*_MATRIX_LAYERS, *_RECURRENT, *_VECTOR_LAYERS, eqx.nn.Embedding)
  named_head = False
  for mpath, sub in _modules(module):
    names = _paths.path_str(mpath).split('/')
    named = [n for n in names if _names.matches(n, head_names)]
    named_head = named_head or (bool(named) and _has_arrays(sub))
    if not isinstance(sub, known):
      continue
    leaves = []
    for kp, x in _children(sub):
      path = _paths.path_str(mpath + kp)
      if path in decisions and not is_module(x):
        leaves.append((path, _paths.path_str(kp[:1]), tuple(np.shape(x))))
    for path, found in _layer_decisions(sub, leaves).items():
      if found.kind == MATRIX and named:
        why = f'named {named[-1]!r}; {found.why}'
        found = found._replace(kind=HEAD, why=why)
      decisions[path] = found
  if not named_head:
    found = _output_layer(module)
    if found is not None:
      mpath, layer, container = found
      for kp, _ in _children(layer):
        path = _paths.path_str(mpath + kp)
        d = decisions.get(path)
        if d is not None and d.kind == MATRIX:
          why = f'the last layer of {container}; {d.why}'
          decisions[path] = d._replace(kind=HEAD, why=why)
  return _routing.Source('equinox', base.paths, base.shapes, decisions)
