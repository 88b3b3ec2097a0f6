"""Flax NNX support: routing rules from the layer types of a module.

Loaded only when flax is (`muon_optax._routing` asks for it when a user's
object could be an NNX module), so `import muon_optax` never imports flax.
"""

from collections.abc import Sequence
from typing import Any

from flax import nnx
import numpy as np

from muon_optax import _rules
from muon_optax._views import MatrixView

_KNOWN = (
  nnx.Conv,
  nnx.ConvTranspose,
  nnx.Embed,
  nnx.Linear,
  nnx.LinearGeneral,
  nnx.Einsum,
)


def is_module(x: Any) -> bool:
  return isinstance(x, nnx.Module)


def is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def params(module: nnx.Module) -> Any:
  """The module's `nnx.Param` state, the tree `nnx.Optimizer` optimizes."""
  return nnx.state(module, nnx.Param)


def _einsum_view(einsum_str: str, ndim: int) -> MatrixView | None:
  spec = einsum_str.replace(' ', '')
  if '...' in spec or '->' not in spec:
    return None
  inputs, out = spec.split('->')
  operands = inputs.split(',')
  if len(operands) != 2 or len(operands[1]) != ndim:
    return None
  lhs, kernel = operands
  red = [i - ndim for i, c in enumerate(kernel) if c not in out]
  outs = [i - ndim for i, c in enumerate(kernel) if c in out and c not in lhs]
  if not red or not outs:
    return None
  return MatrixView(tuple(red), tuple(outs))


def _layer_rule(module: Any, name: str, shape) -> _rules.Rule | None:
  """The rule a param of a known NNX layer gets, or None if unknown."""
  if not isinstance(module, _KNOWN):
    return None
  if name != 'kernel' and not isinstance(module, nnx.Embed):
    return _rules.Rule(_rules.ADAM, None, name)
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    num_spatial = len(module.kernel_size)
    if isinstance(module, nnx.ConvTranspose) and module.transpose_kernel:
      view = MatrixView(tuple(range(-num_spatial - 2, -2)) + (-1,), (-2,))
    else:
      view = MatrixView.conv(num_spatial)
    groups = getattr(module, 'feature_group_count', 1) or 1
    if groups > 1 and module.in_features // groups == 1:
      return _rules.Rule(_rules.ADAM, view, 'depthwise conv')
    return _rules.Rule(_rules.MUON, view, 'conv')
  if isinstance(module, nnx.Embed):
    return _rules.Rule(_rules.ADAM, None, 'embedding')
  if isinstance(module, nnx.LinearGeneral):
    view = MatrixView.general(len(module.in_features), len(module.out_features))
    return _rules.Rule(_rules.MUON, view, 'linear')
  if isinstance(module, nnx.Linear):
    return _rules.Rule(_rules.MUON, MatrixView.dense(), 'linear')
  view = _einsum_view(module.einsum_str, len(module.kernel_shape))
  return _rules.Rule(_rules.MUON, view, 'einsum') if view else None


def module_rules(
  module: nnx.Module, rules: dict[str, _rules.Rule], head_names: Sequence[str]
) -> dict[str, _rules.Rule]:
  """`rules` (the plain-tree ones) refined by the layer types."""
  rules = dict(rules)
  for mpath, sub in nnx.iter_graph(module):
    if not isinstance(sub, nnx.Module):
      continue
    prefix = '/'.join(str(p) for p in mpath)
    # Any enclosing layer named as a head: a head may be a Sequential.
    is_head = any(_rules.matches(str(p), head_names) for p in mpath)
    for name, var in vars(sub).items():
      if not isinstance(var, nnx.Param):
        continue
      path = f'{prefix}/{name}' if prefix else name
      if path not in rules:
        continue
      shape = tuple(np.shape(var.get_value()))
      found = _layer_rule(sub, name, shape)
      if found is None:
        continue  # keep the plain-tree rule
      label, view, why = found
      if view is not None:
        try:
          view.resolve(shape)
        except ValueError:
          continue
      if label == _rules.MUON and is_head:
        label, why = _rules.ADAM, 'output head'
      rules[path] = _rules.Rule(label, view, f'{why} ({type(sub).__name__})')
  return rules
