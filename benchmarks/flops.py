"""FLOPs of the matmuls and convolutions in a traced function.

XLA's CPU cost analysis undercounts convolutions (it reports 1.2 GFLOP for
a ConvNet forward that does about 6), so the train-step prediction counts
`dot_general` and `conv_general_dilated` in the jaxpr instead.
"""

import math
from typing import Any

import jax
from jax.extend import core


def _sub_jaxprs(params: dict[str, Any]):
  for v in params.values():
    items = v if isinstance(v, (list, tuple)) else (v,)
    for item in items:
      if isinstance(item, core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, core.Jaxpr):
        yield item


def _count(jaxpr: core.Jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lc, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[d] for d in lc)
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      rhs_out = eqn.params['dimension_numbers'].rhs_spec[0]
      total += 2 * math.prod(out) * math.prod(rhs) / rhs[rhs_out]
    else:
      mult = eqn.params.get('length', 1) if name == 'scan' else 1
      for sub in _sub_jaxprs(eqn.params):
        total += mult * _count(sub)
  return total


def matmul_flops(fn, *args: Any) -> float:
  """FLOPs of every dot and convolution `fn(*args)` would run."""
  return _count(jax.make_jaxpr(fn)(*args).jaxpr)
