"""The Flax NNX source: what a module's parameters are, from its layer types.

Loaded only when flax is (`muon_optax._route` asks for it when a user's
object is an NNX module), so `import muon_optax` never imports flax. Layers
it does not know keep the names-and-shapes decisions.
"""

from collections.abc import Sequence
from typing import Any

from flax import nnx
import numpy as np

from muon_optax import _names
from muon_optax import _routing
from muon_optax._routing import HEAD
from muon_optax._routing import MATRIX
from muon_optax._routing import OTHER
from muon_optax._routing import Decision
from muon_optax._views import MatrixView

_KNOWN = (
  nnx.Conv,
  nnx.ConvTranspose,
  nnx.Embed,
  nnx.Linear,
  nnx.LinearGeneral,
  nnx.Einsum,
)


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


def _layer_decision(module: Any, name: str) -> Decision | None:
  """What a param of a known NNX layer is, or None if the layer is unknown."""
  if not isinstance(module, _KNOWN):
    return None
  kind = type(module).__name__
  if isinstance(module, nnx.Embed):
    return Decision(OTHER, None, f'embedding ({kind})')
  if name != 'kernel':
    return Decision(OTHER, None, f'{name} ({kind})')
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    num_spatial = len(module.kernel_size)
    if isinstance(module, nnx.ConvTranspose) and module.transpose_kernel:
      view = MatrixView(tuple(range(-num_spatial - 2, -2)) + (-1,), (-2,))
    else:
      view = MatrixView.conv(num_spatial)
    groups = getattr(module, 'feature_group_count', 1) or 1
    if groups > 1 and module.in_features // groups == 1:
      return Decision(OTHER, view, f'depthwise conv ({kind})', conv=True)
    return Decision(MATRIX, view, f'conv ({kind})', conv=True)
  if isinstance(module, nnx.LinearGeneral):
    view = MatrixView.general(len(module.in_features), len(module.out_features))
    return Decision(MATRIX, view, f'linear ({kind})')
  if isinstance(module, nnx.Linear):
    return Decision(MATRIX, MatrixView.dense(), f'linear ({kind})')
  view = _einsum_view(module.einsum_str, len(module.kernel_shape))
  return Decision(MATRIX, view, f'einsum ({kind})') if view else None


def source(
  module: nnx.Module,
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
  attention = {}
  for mpath, sub in nnx.iter_graph(module):
    if not isinstance(sub, nnx.Module):
      continue
    prefix = '/'.join(str(p) for p in mpath)
    if isinstance(sub, nnx.MultiHeadAttention):
      q, k = f'{prefix}/query/kernel', f'{prefix}/key/kernel'
      if q in decisions and k in decisions:
        attention[prefix] = (q, k)
    # Any enclosing layer named as a head: a head may be a Sequential.
    named = [str(p) for p in mpath if _names.matches(str(p), head_names)]
    for name, var in vars(sub).items():
      if not isinstance(var, nnx.Param):
        continue
      path = f'{prefix}/{name}' if prefix else name
      if path not in decisions:
        continue
      found = _layer_decision(sub, name)
      if found is None:
        continue  # keep the names-and-shapes decision
      if found.view is not None:
        try:
          found.view.resolve(tuple(np.shape(var.get_value())))
        except ValueError:
          continue
      if found.kind == MATRIX and named:
        why = f'named {named[-1]!r}; {found.why}'
        found = found._replace(kind=HEAD, why=why)
      decisions[path] = found
  if not any(d.kind == HEAD for d in decisions.values()):
    _mark_last_layer(module, decisions)
  return _routing.Source(
    'nnx', base.paths, base.shapes, decisions, attention or base.attention
  )


def _mark_last_layer(module: nnx.Module, decisions: dict[str, Decision]):
  """With no head named: an `nnx.Sequential` model's last layer with
  parameters is its head (its order is the call order; a custom module's
  attribute order need not be)."""
  path: list[str] = []
  while isinstance(module, nnx.Sequential):
    layers = [
      (i, layer)
      for i, layer in enumerate(module.layers)
      if isinstance(layer, nnx.Module) and nnx.state(layer, nnx.Param)
    ]
    if not layers:
      return
    i, module = layers[-1]
    path += ['layers', str(i)]
  prefix = '/'.join(path)
  for name in ('kernel', 'embedding'):
    key = f'{prefix}/{name}'
    d = decisions.get(key)
    if path and d is not None and d.kind == MATRIX:
      why = f'the last layer of the Sequential; {d.why}'
      decisions[key] = d._replace(kind=HEAD, why=why)
