"""Equinox support: routing rules from the layer types of a module.

Loaded only when equinox is (`muon_optax._routing` asks for it when a user's
object is an Equinox module), so `import muon_optax` never imports equinox.

Equinox layers store PyTorch's layouts: `Linear.weight` is `(out, in)`, and
`Conv`'s and `ConvTranspose`'s weights are `(out, in // groups, *spatial)`
(`ConvTranspose` runs `lax.conv_general_dilated` with the same OIHW kernel
and a dilated input, so its fan-in is `in // groups * prod(spatial)` too).
The views use negative axes, so a stacked (vmapped) layer's leading axes
are a batch of matrices.

Layer rules: `Linear`, `Conv*` and `ConvTranspose*` weights go to Muon
(depthwise ones, one input channel per group, to Adam); `GRUCell` and
`LSTMCell` weights are `(gates * hidden, in)` matrices, Muon; `Embedding`
tables, norms (`LayerNorm`, `RMSNorm`, `GroupNorm`, `BatchNorm`), `PReLU`,
`StateIndex` state and every bias go to Adam; any other leaf gets the
plain-tree rules.

The output head is found two ways, and goes to Adam:

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

from muon_optax import _paths
from muon_optax import _rules
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


def _layer_rules(
  layer: Any, leaves: list[tuple[str, str, tuple[int, ...]]]
) -> dict[str, _rules.Rule]:
  """Rules for a known layer's own arrays: `(path, field, shape)` each."""
  kind = type(layer).__name__
  rules = {}
  for path, field, shape in leaves:
    if isinstance(layer, _VECTOR_LAYERS):
      what = 'state' if isinstance(layer, eqx.nn.StateIndex) else field
      rules[path] = _rules.Rule(_rules.ADAM, None, f'{what} ({kind})')
      continue
    if isinstance(layer, eqx.nn.Embedding):
      rules[path] = _rules.Rule(_rules.ADAM, None, f'embedding ({kind})')
      continue
    is_weight = field == 'weight' or (
      isinstance(layer, _RECURRENT) and field in ('weight_ih', 'weight_hh')
    )
    if not is_weight:
      rules[path] = _rules.Rule(_rules.ADAM, None, f'{field} ({kind})')
      continue
    if isinstance(layer, _CONV):
      own_ndim = layer.num_spatial_dims + 2
      view = _rules.out_in_view(own_ndim)
      why = 'conv (out, in, *spatial)'
      if layer.groups > 1 and layer.in_channels // layer.groups == 1:
        label, why = _rules.ADAM, 'depthwise conv'
      else:
        label = _rules.MUON
    else:
      own_ndim = 2
      view = _OUT_IN
      label = _rules.MUON
      why = 'linear' if isinstance(layer, eqx.nn.Linear) else 'recurrent'
    if len(shape) < own_ndim:
      continue  # not the layout this layer makes: keep the plain rule
    rules[path] = _rules.Rule(label, view, f'{why} ({kind})')
  return rules


def module_rules(
  module: eqx.Module, rules: dict[str, _rules.Rule], head_names: Sequence[str]
) -> dict[str, _rules.Rule]:
  """`rules` (the plain-tree ones) refined by the layer types."""
  rules = dict(rules)
  known = (*_MATRIX_LAYERS, *_RECURRENT, *_VECTOR_LAYERS, eqx.nn.Embedding)
  named_head = False
  for mpath, sub in _modules(module):
    names = _paths.path_str(mpath).split('/')
    in_head = any(_rules.matches(n, head_names) for n in names)
    named_head = named_head or (in_head and _has_arrays(sub))
    if not isinstance(sub, known):
      continue
    leaves = []
    for kp, x in _children(sub):
      path = _paths.path_str(mpath + kp)
      if path in rules and not is_module(x):
        leaves.append((path, _paths.path_str(kp[:1]), tuple(np.shape(x))))
    for path, (label, view, why) in _layer_rules(sub, leaves).items():
      if label == _rules.MUON and in_head:
        label, why = _rules.ADAM, f'output head ({type(sub).__name__})'
      rules[path] = _rules.Rule(label, view, why)
  if not named_head:
    found = _output_layer(module)
    if found is not None:
      mpath, layer, container = found
      for kp, _ in _children(layer):
        path = _paths.path_str(mpath + kp)
        rule = rules.get(path)
        if rule is not None and rule.label == _rules.MUON:
          why = f'output head (last layer of {container})'
          rules[path] = _rules.Rule(_rules.ADAM, rule.view, why)
  return rules
