"""Routing read from a model's computation: how each parameter is used.

`trace_routing` traces the model's function abstractly (`jax.make_jaxpr`: no
FLOPs run, nothing is compiled) and follows every parameter through the
jaxpr. A parameter that is a kernel of a convolution, or an operand of a
`dot_general` against activations, is a weight matrix (Muon); one read by
indexing is an embedding, one used only elementwise is a bias, a scale or a
token (Adam). The matrix view comes from the op itself: the contracted axes
are the fan-in, whatever the layout, so PyTorch-style `(out, in)` and OIHW
kernels, attention projections with head axes and stacked (scanned) layers
need no naming convention.

Usage, one line per library:

- Flax Linen: `trace_routing(lambda p, x: model.apply({'params': p}, x),
  params, x)`
- Flax NNX: `graphdef, state, rest = nnx.split(model, nnx.Param, ...)`, then
  `trace_routing(lambda s, x: nnx.merge(graphdef, s, rest)(x), state, x)`
- Equinox: `params, static = eqx.partition(model, eqx.is_inexact_array)`,
  then `trace_routing(lambda p, x: eqx.combine(p, static)(x), params, x)`
- plain JAX: `trace_routing(loss_fn, params, batch)`
"""

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
import dataclasses
import sys
from typing import Any

import jax
from jax.extend import core as jex
import numpy as np

from muon_optax import _paths
from muon_optax import _rules
from muon_optax._routing import Routing
from muon_optax._views import MatrixView

MUON = _rules.MUON
ADAM = _rules.ADAM
HEADS = (ADAM, MUON)
# Ops that move a value without changing it (operand axis -> output axis).
_IDENTITY = frozenset(
  {
    'convert_element_type',
    'copy',
    'copy_p',
    'reduce_precision',
    'slice',
    'rev',
    'pad',
    'stop_gradient',
    'sharding_constraint',
    'pvary',
    'mesh_cast',
    'reshard',
    'device_put',
    'optimization_barrier',
  }
)
_STRUCTURAL = _IDENTITY | {
  'reshape',
  'transpose',
  'broadcast_in_dim',
  'squeeze',
  'concatenate',
}
# Reads of a table at positions given by other values.
_INDEXING = frozenset(
  {
    'gather',
    'dynamic_slice',
    'dynamic_update_slice',
    'scatter',
    'scatter-add',
    'scatter_add',
    'scatter-mul',
    'scatter_mul',
    'scatter-min',
    'scatter_min',
    'scatter-max',
    'scatter_max',
  }
)
_REDUCTIONS = frozenset(
  {
    'reduce_sum',
    'reduce_max',
    'reduce_min',
    'reduce_prod',
    'reduce_and',
    'reduce_or',
    'reduce_xor',
    'argmax',
    'argmin',
  }
)
_MAX_FIXED_POINT = 64


@dataclasses.dataclass(frozen=True)
class _Ref:
  """A value that is a parameter leaf moved about, not computed with.

  `axes[i]` holds the leaf's axes that axis `i` of the value spans: one for a
  transposed or sliced axis, several where a reshape merged (or could not
  separate) them, none where a broadcast made the axis. Leaf axes that no
  value axis spans were indexed away (scan over stacked layers, `w[0]`).
  """

  leaf: int
  axes: tuple[frozenset[int], ...]


Tags = tuple[frozenset[tuple[int, int]], ...]


@dataclasses.dataclass(frozen=True)
class _Info:
  """What the analysis knows about one value of the jaxpr.

  data: computed from the function's non-parameter inputs (activations).
  refs: the parameter leaves this value is a re-layout of.
  derived: leaves a parameter-only value was computed from (not a re-layout).
  heads: leaves whose matmul output reaches this value without passing
    through another parameterised matmul.
  tags: per axis, the (leaf, leaf axis) pairs of the weight fan-out axes that
    this activation axis comes from; None where not followed.
  """

  data: bool = False
  refs: frozenset[_Ref] = frozenset()
  derived: frozenset[int] = frozenset()
  heads: frozenset[int] = frozenset()
  tags: Tags | None = None


_NOTHING = _Info()
_ACTIVATION = _Info(data=True)


@dataclasses.dataclass(frozen=True)
class _Use:
  kind: str  # matmul, index, elementwise, other, unclassified, indirect
  what: str  # the primitive, or a sentence for unclassified uses
  reduction: frozenset[int] = frozenset()
  output: frozenset[int] = frozenset()
  conv_layout: str = ''  # letters per leaf axis, for convolution kernels
  depthwise: bool = False
  groups: int = 1


def _shape(v: Any) -> tuple[int, ...]:
  return tuple(getattr(v.aval, 'shape', ()))


def _union_tags(shape_len: int, parts: Iterable[Tags | None]) -> Tags | None:
  parts = [p for p in parts if p is not None and len(p) == shape_len]
  if not parts:
    return None
  return tuple(
    frozenset().union(*(p[i] for p in parts)) for i in range(shape_len)
  )


def _map_tags(
  tags: Tags | None, sources: Sequence[Sequence[int]]
) -> Tags | None:
  if tags is None:
    return None
  return tuple(frozenset().union(*(tags[j] for j in src)) for src in sources)


def _map_ref(ref: _Ref, sources: Sequence[Sequence[int]]) -> _Ref:
  axes = tuple(
    frozenset().union(*(ref.axes[j] for j in src)) for src in sources
  )
  return _Ref(ref.leaf, axes)


def _reshape_sources(
  in_shape: Sequence[int], out_shape: Sequence[int]
) -> list[tuple[int, ...]]:
  """For each output axis of a reshape, the input axes it may come from.

  Axes are matched in groups of equal size products; every output axis of a
  group maps to every input axis of it, which is exact for a pure merge or a
  pure split and conservative otherwise (the consumer then sees one leaf axis
  in two roles and declines to classify).
  """
  if 0 in in_shape or 0 in out_shape:
    everything = tuple(range(len(in_shape)))
    return [everything] * len(out_shape)
  ins = [i for i, s in enumerate(in_shape) if s != 1]
  outs = [j for j, s in enumerate(out_shape) if s != 1]
  sources: list[tuple[int, ...]] = [() for _ in out_shape]
  i = j = 0
  while i < len(ins) and j < len(outs):
    gi, gj = [ins[i]], [outs[j]]
    pi, pj = in_shape[ins[i]], out_shape[outs[j]]
    while pi != pj:
      if pi < pj:
        i += 1
        gi.append(ins[i])
        pi *= in_shape[ins[i]]
      else:
        j += 1
        gj.append(outs[j])
        pj *= out_shape[outs[j]]
    for o in gj:
      sources[o] = tuple(gi)
    i += 1
    j += 1
  return sources


def _structural_sources(eqn: Any) -> list[tuple[int, ...]]:
  """For each output axis, the axes of operand 0 (or of any operand) it is."""
  name = eqn.primitive.name
  in_shape = _shape(eqn.invars[0])
  out_shape = _shape(eqn.outvars[0])
  if name == 'transpose':
    return [(p,) for p in eqn.params['permutation']]
  if name == 'reshape':
    return _reshape_sources(in_shape, out_shape)
  if name == 'broadcast_in_dim':
    sources: list[tuple[int, ...]] = [() for _ in out_shape]
    for i, o in enumerate(eqn.params['broadcast_dimensions']):
      sources[o] = (i,)
    return sources
  if name == 'squeeze':
    dims = {d % len(in_shape) for d in eqn.params['dimensions']}
    return [(i,) for i in range(len(in_shape)) if i not in dims]
  return [(i,) for i in range(len(out_shape))]


def _broadcasts(shape: Sequence[int], out_shape: Sequence[int]) -> bool:
  """Whether an operand of `shape` is elementwise to an `out_shape` result."""
  if not shape:
    return True
  return len(shape) == len(out_shape) and all(
    s in (o, 1) for s, o in zip(shape, out_shape, strict=True)
  )


def _letters(num_spatial: int) -> str:
  return 'DHW'[-num_spatial:] if num_spatial <= 3 else 'S' * num_spatial


def _axes_text(axes: Sequence[int]) -> str:
  axes = sorted(axes)
  word = 'axis' if len(axes) == 1 else 'axes'
  return f'{word} {", ".join(map(str, axes))}'


class _Analysis:
  """Abstract interpretation of a jaxpr over `_Info` values."""

  def __init__(self, num_leaves: int):
    self.uses: list[set[_Use]] = [set() for _ in range(num_leaves)]
    self.experts: list[set[int]] = [set() for _ in range(num_leaves)]

  def use(self, info: _Info, use: _Use) -> None:
    for ref in info.refs:
      self.uses[ref.leaf].add(use)

  # -- jaxprs -----------------------------------------------------------

  def run(
    self, jaxpr: Any, ins: Sequence[_Info], consts: Sequence[_Info] = ()
  ) -> list[_Info]:
    if isinstance(jaxpr, jex.ClosedJaxpr):
      consts = [_ACTIVATION] * len(jaxpr.consts)
      jaxpr = jaxpr.jaxpr
    env: dict[Any, _Info] = {}

    def read(v: Any) -> _Info:
      if isinstance(v, jex.Literal):
        return _NOTHING
      return env.get(v, _NOTHING)

    for v, info in zip(jaxpr.constvars, consts, strict=True):
      env[v] = info
    for v, info in zip(jaxpr.invars, ins, strict=True):
      env[v] = info
    for eqn in jaxpr.eqns:
      outs = self.eqn(eqn, [read(v) for v in eqn.invars])
      for v, info in zip(eqn.outvars, outs, strict=True):
        env[v] = info
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    name = eqn.primitive.name
    if name == 'dot_general':
      return [self.dot_general(eqn, ins)]
    if name == 'conv_general_dilated':
      return [self.conv(eqn, ins)]
    if name == 'scan':
      return self.scan(eqn, ins)
    if name == 'while':
      return self.while_loop(eqn, ins)
    if name == 'cond':
      return self.cond(eqn, ins)
    if name in _INDEXING:
      return self.indexing(eqn, ins)
    if name in _STRUCTURAL:
      return self.structural(eqn, ins)
    subs = [
      p
      for p in eqn.params.values()
      if isinstance(p, (jex.Jaxpr, jex.ClosedJaxpr))
    ]
    if len(subs) == 1:
      sub = subs[0]
      inner = sub.jaxpr if isinstance(sub, jex.ClosedJaxpr) else sub
      if len(inner.invars) == len(ins) and len(inner.outvars) == len(
        eqn.outvars
      ):
        return self.run(sub, ins)
    if subs or any(
      isinstance(p, (tuple, list))
      and any(isinstance(q, (jex.Jaxpr, jex.ClosedJaxpr)) for q in p)
      for p in eqn.params.values()
    ):
      for info in ins:
        self.use(
          info,
          _Use('unclassified', f'passed into `{name}`, which is not followed'),
        )
      return self.opaque(eqn, ins)
    return self.generic(eqn, ins)

  # -- ops on values ----------------------------------------------------

  def opaque(self, eqn: Any, ins: Sequence[_Info]) -> list[_Info]:
    data = any(i.data for i in ins)
    heads = frozenset().union(*(i.heads for i in ins))
    derived = self._derived(ins) if not data else frozenset()
    return [_Info(data, frozenset(), derived, heads) for _ in eqn.outvars]

  @staticmethod
  def _derived(ins: Iterable[_Info]) -> frozenset[int]:
    out: set[int] = set()
    for info in ins:
      out |= info.derived
      out |= {r.leaf for r in info.refs}
    return frozenset(out)

  def generic(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    """Any op that computes with its operands (elementwise, reductions...)."""
    name = eqn.primitive.name
    out_shape = _shape(eqn.outvars[0]) if eqn.outvars else ()
    for v, info in zip(eqn.invars, ins, strict=True):
      if info.refs:
        shape = _shape(v)
        elementwise = len(eqn.outvars) == 1 and _broadcasts(shape, out_shape)
        self.use(info, _Use('elementwise' if elementwise else 'other', name))
    outs = self.opaque(eqn, ins)
    for k, v in enumerate(eqn.outvars):
      shape = _shape(v)
      if name in _REDUCTIONS and len(ins) == 1:
        axes = set(eqn.params.get('axes', ()))
        kept = [
          (i,) for i in range(len(_shape(eqn.invars[0]))) if i not in axes
        ]
        tags = _map_tags(ins[0].tags, kept) if len(kept) == len(shape) else None
      else:
        same = [
          i.tags
          for u, i in zip(eqn.invars, ins, strict=True)
          if len(_shape(u)) == len(shape) and _broadcasts(_shape(u), shape)
        ]
        tags = _union_tags(len(shape), same)
      outs[k] = dataclasses.replace(outs[k], tags=tags)
    return outs

  def structural(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    name = eqn.primitive.name
    if name in ('optimization_barrier', 'device_put'):
      return list(ins[: len(eqn.outvars)])
    # Concatenate moves every operand; the others move operand 0 (pad's
    # second operand is its padding value).
    moved = list(ins) if name == 'concatenate' else [ins[0]]
    sources = _structural_sources(eqn)
    data = any(i.data for i in ins)
    heads = frozenset().union(*(i.heads for i in ins))
    tags = _union_tags(
      len(sources), [_map_tags(i.tags, sources) for i in moved]
    )
    if data:
      for info in moved:
        self.use(info, _Use('elementwise', name))
      return [_Info(True, frozenset(), frozenset(), heads, tags)]
    refs = frozenset(_map_ref(r, sources) for i in moved for r in i.refs)
    derived = frozenset().union(*(i.derived for i in ins))
    return [_Info(False, refs, derived, heads, tags)]

  def indexing(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    name = eqn.primitive.name
    if name == 'dynamic_slice':
      if not any(i.data for i in ins[1:]):
        # Positions fixed by the program (a loop counter, `w[0]`): a slice of
        # stacked layers, not a lookup by data.
        return self.structural(eqn, ins)
    table_operands = (
      ins[:2] if name.startswith(('scatter', 'dynamic_u')) else ins[:1]
    )
    for info in table_operands:
      self.use(info, _Use('index', name))
    return self.opaque(eqn, ins)

  @staticmethod
  def _heads(lhs: _Info, rhs: _Info) -> frozenset[int]:
    """The heads of a matmul-like op's output.

    An op with a parameter operand (a re-layout or not) against activations
    is a parameterised matmul: its output starts afresh from its own leaves.
    """
    own: set[int] = set()
    for side, other in ((lhs, rhs), (rhs, lhs)):
      if other.data and not side.data:
        own |= {r.leaf for r in side.refs} | side.derived
    return frozenset(own) if own else lhs.heads | rhs.heads

  def _param_side(self, side: _Info, other: _Info, name: str) -> bool:
    """Records a matmul-like op's non-matmul uses; True if a weight use."""
    if side.refs and other.data:
      return True
    if side.refs:
      self.use(side, _Use('indirect', f'{name} with no activation operand'))
    elif side.derived and not side.data and other.data:
      for leaf in side.derived:
        self.uses[leaf].add(
          _Use('indirect', f'{name} operand only after non-layout ops')
        )
    return False

  def _matmul_use(
    self,
    ref: _Ref,
    reduction_axes: Iterable[int],
    output_axes: Iterable[int],
    name: str,
    *,
    conv_roles: dict[int, str] | None = None,
    depthwise: bool = False,
    groups: int = 1,
  ) -> None:
    reduction_axes, output_axes = set(reduction_axes), set(output_axes)
    roles: dict[int, set[str]] = {}
    for i, srcs in enumerate(ref.axes):
      role = 'r' if i in reduction_axes else 'o' if i in output_axes else 'b'
      for a in srcs:
        roles.setdefault(a, set()).add(role)
    mixed = sorted(a for a, r in roles.items() if len(r) > 1)
    if mixed:
      self.uses[ref.leaf].add(
        _Use(
          'unclassified',
          f'{name} operand whose axis map is ambiguous (leaf '
          f'{_axes_text(mixed)} both contracted and kept after a reshape)',
        )
      )
      return
    layout = ''
    if conv_roles is not None and all(len(s) == 1 for s in ref.axes):
      flat = [next(iter(s)) for s in ref.axes]
      if len(set(flat)) == len(flat):
        letters = dict.fromkeys(range(max(flat, default=-1) + 1), 'B')
        for i, a in enumerate(flat):
          letters[a] = conv_roles[i]
        layout = ''.join(letters[a] for a in sorted(letters))
    self.uses[ref.leaf].add(
      _Use(
        'matmul',
        name,
        frozenset(a for a, r in roles.items() if r == {'r'}),
        frozenset(a for a, r in roles.items() if r == {'o'}),
        layout,
        depthwise,
        groups,
      )
    )

  def dot_general(self, eqn: Any, ins: list[_Info]) -> _Info:
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    lnd, rnd = len(_shape(eqn.invars[0])), len(_shape(eqn.invars[1]))
    lfree = [i for i in range(lnd) if i not in lc and i not in lb]
    rfree = [i for i in range(rnd) if i not in rc and i not in rb]
    is_weight = []
    for side, other, c, free, obatch in (
      (lhs, rhs, lc, lfree, rb),
      (rhs, lhs, rc, rfree, lb),
    ):
      is_weight.append(self._param_side(side, other, 'dot_general'))
      if not is_weight[-1]:
        continue
      for ref in side.refs:
        self._matmul_use(ref, c, free, 'dot_general')
        # An activation axis made by another weight's fan-out that meets
        # this weight's batch axis indexes a bank of separate matrices (MoE
        # experts): that weight's axis is a batch axis too.
        if other.tags is not None:
          for ob in obatch:
            for leaf, axis in other.tags[ob]:
              self.experts[leaf].add(axis)

    def side_tags(side: _Info, axes: Sequence[int], nd: int, weight: bool):
      if weight:
        out = []
        for i in axes:
          tag = set()
          for ref in side.refs:
            tag |= {(ref.leaf, a) for a in ref.axes[i]}
          out.append(frozenset(tag))
        return out
      if side.tags is None or len(side.tags) != nd:
        return [frozenset()] * len(axes)
      return [side.tags[i] for i in axes]

    lw, rw = is_weight
    lbt = side_tags(lhs, lb, lnd, False) if not lw else [frozenset()] * len(lb)
    rbt = side_tags(rhs, rb, rnd, False) if not rw else [frozenset()] * len(rb)
    tags = tuple(
      [a | b for a, b in zip(lbt, rbt, strict=True)]
      + side_tags(lhs, lfree, lnd, lw)
      + side_tags(rhs, rfree, rnd, rw)
    )
    data = lhs.data or rhs.data
    derived = frozenset() if data else self._derived(ins)
    return _Info(data, frozenset(), derived, self._heads(lhs, rhs), tags)

  def conv(self, eqn: Any, ins: list[_Info]) -> _Info:
    lhs, rhs = ins[:2]
    dn = eqn.params['dimension_numbers']
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    groups = eqn.params.get('feature_group_count', 1)
    batch_groups = eqn.params.get('batch_group_count', 1)
    if self._param_side(lhs, rhs, 'conv_general_dilated'):
      self.use(lhs, _Use('unclassified', 'input (not kernel) of a conv'))
    weight = self._param_side(rhs, lhs, 'conv_general_dilated')
    if weight and batch_groups != 1:
      self.use(
        rhs,
        _Use(
          'unclassified', f'conv kernel with batch_group_count={batch_groups}'
        ),
      )
      weight = False
    elif weight:
      rshape = _shape(eqn.invars[1])
      out_ax, in_ax, *spatial = rhs_spec
      depthwise = groups > 1 and rshape[in_ax] == 1
      letters = _letters(len(spatial))
      roles = {out_ax: 'O', in_ax: 'I'}
      roles.update({s: letters[k] for k, s in enumerate(spatial)})
      for ref in rhs.refs:
        self._matmul_use(
          ref,
          [in_ax, *spatial],
          [out_ax],
          'conv_general_dilated',
          conv_roles=roles,
          depthwise=depthwise,
          groups=groups,
        )
    nd = len(_shape(eqn.outvars[0]))
    tags: list[frozenset] = [frozenset()] * nd
    if lhs.tags is not None and len(lhs.tags) == nd:
      tags[out_spec[0]] = lhs.tags[lhs_spec[0]]
      for k in range(2, nd):
        tags[out_spec[k]] = lhs.tags[lhs_spec[k]]
    if weight:
      tags[out_spec[1]] = frozenset(
        (r.leaf, a) for r in rhs.refs for a in r.axes[rhs_spec[0]]
      )
    data = any(i.data for i in ins)
    derived = frozenset() if data else self._derived(ins)
    return _Info(data, frozenset(), derived, self._heads(lhs, rhs), tuple(tags))

  # -- control flow -----------------------------------------------------

  def join(self, a: _Info, b: _Info) -> _Info:
    data = a.data or b.data
    refs = a.refs | b.refs
    if data and refs:
      for ref in refs:
        self.uses[ref.leaf].add(
          _Use('unclassified', 'carried through a loop with activations')
        )
      refs = frozenset()
    if a.tags is None or b.tags is None or len(a.tags) != len(b.tags):
      tags = a.tags if b.tags is None else b.tags
    else:
      tags = tuple(x | y for x, y in zip(a.tags, b.tags, strict=True))
    derived = frozenset() if data else a.derived | b.derived
    return _Info(data, refs, derived, a.heads | b.heads, tags)

  def _fixed_point(
    self,
    body: Callable[[list[_Info]], list[_Info]],
    carry: list[_Info],
    what: str,
  ) -> tuple[list[_Info], list[_Info]]:
    for _ in range(_MAX_FIXED_POINT):
      outs = body(carry)
      new = [self.join(c, o) for c, o in zip(carry, outs, strict=False)]
      if new == carry:
        return carry, outs
      carry = new
    raise RuntimeError(f'trace_routing: the {what} carry analysis diverged.')

  def scan(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    p = eqn.params
    nc, ncar = p['num_consts'], p['num_carry']
    consts, carry, xs = ins[:nc], list(ins[nc : nc + ncar]), ins[nc + ncar :]

    def sliced(info: _Info) -> _Info:
      refs = frozenset(_Ref(r.leaf, r.axes[1:]) for r in info.refs)
      tags = info.tags[1:] if info.tags else None
      return dataclasses.replace(info, refs=refs, tags=tags)

    def stacked(info: _Info) -> _Info:
      refs = frozenset(_Ref(r.leaf, (frozenset(),) + r.axes) for r in info.refs)
      tags = (frozenset(),) + info.tags if info.tags is not None else None
      return dataclasses.replace(info, refs=refs, tags=tags)

    xs = [sliced(x) for x in xs]
    carry, outs = self._fixed_point(
      lambda c: self.run(p['jaxpr'], [*consts, *c, *xs]), carry, 'scan'
    )
    return carry + [stacked(y) for y in outs[ncar:]]

  def while_loop(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    p = eqn.params
    cn, bn = p['cond_nconsts'], p['body_nconsts']
    cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], list(ins[cn + bn :])

    def body(c: list[_Info]) -> list[_Info]:
      self.run(p['cond_jaxpr'], [*cconsts, *c])
      return self.run(p['body_jaxpr'], [*bconsts, *c])

    carry, _ = self._fixed_point(body, carry, 'while')
    return carry

  def cond(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    outs = None
    for branch in eqn.params['branches']:
      res = self.run(branch, ins[1:])
      outs = (
        res
        if outs is None
        else [self.join(a, b) for a, b in zip(outs, res, strict=True)]
      )
    return outs or []


def _is_variable(x: Any) -> bool:
  # Without flax imported there can be no Variable; never import it here.
  nnx = sys.modules.get('flax.nnx')
  return nnx is not None and isinstance(x, nnx.Variable)


def _is_view(x: Any) -> bool:
  return x is None or isinstance(x, MatrixView)


def _struct(x: Any, what: str) -> jax.ShapeDtypeStruct:
  """Shape and dtype only, so that tracing cannot touch the values."""
  if isinstance(x, (bool, int, float, complex, np.generic)):
    x = np.asarray(x)
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    dtype = x.dtype
    if isinstance(dtype, np.dtype):  # not a PRNG key's extended dtype
      dtype = jax.dtypes.canonicalize_dtype(dtype)
    return jax.ShapeDtypeStruct(tuple(x.shape), dtype)
  raise TypeError(
    f'{what} is a {type(x).__name__}; trace_routing needs arrays or '
    '`jax.ShapeDtypeStruct`s as parameter leaves.'
  )


def _is_arraylike(x: Any) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct) or (
    hasattr(x, 'shape') and hasattr(x, 'dtype')
  )


def _decide(
  uses: set[_Use],
  experts: set[int],
  shape: tuple[int, ...],
  is_head: bool,
  head: str,
) -> tuple[str, MatrixView | None, str]:
  by_kind: dict[str, list[_Use]] = {}
  for u in sorted(uses, key=lambda u: (u.kind, u.what)):
    by_kind.setdefault(u.kind, []).append(u)
  matmuls = by_kind.get('matmul', [])
  if 'index' in by_kind:
    why = f'{by_kind["index"][0].what} (embedding)'
    if matmuls:
      why += '; also a matmul operand (tied output head)'
    return ADAM, None, why
  if 'unclassified' in by_kind:
    whys = sorted({u.what for u in by_kind['unclassified']})
    return ADAM, None, 'unclassified: ' + '; '.join(whys)
  if matmuls:
    found = {(u.reduction, u.output) for u in matmuls}
    if len(found) > 1:
      text = ' vs '.join(
        f'({",".join(map(str, sorted(r)))})->({",".join(map(str, sorted(o)))})'
        for r, o in sorted(found, key=lambda v: (sorted(v[0]), sorted(v[1])))
      )
      return ADAM, None, f'conflicting uses: reduction->output axes {text}'
    reduction, output = next(iter(found))
    moved = output & experts
    if moved and output - moved:
      output = output - moved
    else:
      moved = frozenset()
    if not reduction or not output:
      return (
        ADAM,
        None,
        (
          f'{matmuls[0].what} operand with no '
          f'{"contracted" if not reduction else "free"} axis (a vector)'
        ),
      )
    nd = len(shape)
    view = MatrixView(
      tuple(a - nd for a in sorted(reduction)),
      tuple(a - nd for a in sorted(output)),
    )
    resolved = view.resolve(shape)
    m, n = resolved.matrix_shape
    use = matmuls[0]
    if use.what == 'conv_general_dilated':
      dims = 'x'.join(str(shape[a]) for a in sorted(reduction))
      layout = f' ({use.conv_layout})' if use.conv_layout else ''
      kind = 'depthwise conv kernel' if use.depthwise else 'conv kernel'
      why = f'{kind}{layout} {dims} -> {resolved.describe()}'
      if use.groups > 1:
        why += f', {use.groups} groups'
    else:
      why = (
        f'dot_general operand, contracts {_axes_text(reduction)} -> '
        f'{resolved.describe()}'
      )
    if moved:
      why += f' (expert {_axes_text(moved)} as batch)'
    if any(u.depthwise for u in matmuls):
      return ADAM, view, why
    if is_head:
      if head == ADAM:
        return ADAM, view, f'output head (reaches the output); {why}'
      why = f"output head kept on Muon (head='muon'); {why}"
    if _rules.is_degenerate((m, n)):
      return ADAM, view, f'degenerate {m}x{n}; {why}'
    return MUON, view, why
  if 'indirect' in by_kind:
    whys = sorted({u.what for u in by_kind['indirect']})
    return ADAM, None, 'unclassified: ' + '; '.join(whys)
  if 'other' in by_kind:
    prims = sorted(
      {u.what for u in by_kind['other'] + by_kind.get('elementwise', [])}
    )
    return ADAM, None, f'no matmul use (used by {", ".join(prims)})'
  if 'elementwise' in by_kind:
    return ADAM, None, 'elementwise only'
  return ADAM, None, 'unused'


def trace_routing(
  fn: Callable[..., Any],
  params: Any,
  *args: Any,
  head: str = ADAM,
  **kwargs: Any,
) -> Routing:
  """Routing read from how `fn(params, *args, **kwargs)` uses each parameter.

  The function is traced abstractly (`jax.make_jaxpr` on shapes and dtypes
  only: no FLOPs run, nothing compiles), and every array leaf of `params` is
  followed through the jaxpr, including into `jit`, `scan`, `while`, `cond`,
  `remat`, `custom_jvp`/`custom_vjp` and `shard_map` bodies:

  - the kernel of a convolution: Muon, as a `(prod(spatial) * in, out)`
    matrix read from the op's dimension numbers, whatever the layout (HWIO,
    OIHW, ...); a depthwise kernel (one input channel per group): Adam;
  - an operand of a `dot_general` against activations: Muon, fan-in the
    contracted axes, fan-out the free ones; the op's batch axes, the axes a
    `scan` slices per iteration (stacked layers) and an axis whose outputs
    later meet another weight's batch axis (MoE experts) are batch axes;
  - read by indexing (`gather`, `dynamic_slice` at data positions, scatter):
    an embedding, Adam, also when it is reused as a tied output head;
  - the output head, a matmul whose result reaches the function's outputs
    without passing through another parameterised matmul: Adam, unless
    `head='muon'`;
  - used only elementwise (biases, norm scales, added position embeddings,
    class tokens), or unused: Adam.

  A value is followed through reshape, transpose, broadcast, squeeze, slice,
  concatenate and dtype conversions with an axis map (which of the leaf's
  axes each axis is), so a transposed or reshaped kernel still maps its
  contracted axes back to the leaf's. Leaves used in conflicting ways, whose
  axis map a reshape made ambiguous, or that flow somewhere the analysis does
  not follow, go to Adam with a reason that says so. Matrices with a side
  under 4 or an aspect ratio over 128 go to Adam ('degenerate'), as in
  `muon_optax.param_labels`.

  Call it on the function that produces the model's predictions: every
  matmul whose result reaches an output is a head, so a backbone returning
  its residual stream, or `apply` returning updated batch statistics, makes
  heads of the layers feeding them (pass `head='muon'` there).

  Usage:

  - Flax Linen: `trace_routing(lambda p, x: model.apply({'params': p}, x),
    params, x)`
  - Flax NNX: `graphdef, state, rest = nnx.split(model, nnx.Param, ...)`;
    `trace_routing(lambda s, x: nnx.merge(graphdef, s, rest)(x), state, x)`
  - Equinox: `params, static = eqx.partition(model, eqx.is_inexact_array)`;
    `trace_routing(lambda p, x: eqx.combine(p, static)(x), params, x)`
  - plain JAX: `trace_routing(loss_fn, params, batch)`

  Args:
    fn: the model's function, called as `fn(params, *args, **kwargs)`.
    params: a pytree of arrays or `jax.ShapeDtypeStruct`s (a dict, an NNX
      State, an Equinox module).
    *args: the other inputs; array leaves (or `jax.ShapeDtypeStruct`s) are
      traced, any other leaf (a flag, a Python number) is passed as is.
    head: `'adam'` (default) or `'muon'`: where the output head goes.
    **kwargs: keyword inputs, treated as `args`.

  Returns:
    A `Routing` (labels, views and reasons, trees shaped like `params`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from muon_optax import trace_routing
    >>> params = {'w1': jnp.zeros((8, 16)), 'b1': jnp.zeros(16),
    ...           'w2': jnp.zeros((16, 10))}
    >>> def mlp(p, x):
    ...   return jax.nn.relu(x @ p['w1'] + p['b1']) @ p['w2']
    >>> routing = trace_routing(mlp, params, jax.ShapeDtypeStruct((4, 8),
    ...                         jnp.float32))
    >>> routing.labels
    {'b1': 'adam', 'w1': 'muon', 'w2': 'adam'}
    >>> routing.reasons['w1']
    'dot_general operand, contracts axis 0 -> 8x16'
  """
  if head not in HEADS:
    raise ValueError(f"`head` must be 'adam' or 'muon', got {head!r}.")
  if not callable(fn):
    raise TypeError(f'`fn` must be callable, got {type(fn).__name__}.')
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [_paths.path_str(kp) for kp, _ in flat]
  # The result trees hold a label where an NNX State holds a Variable, as
  # `muon_optax.param_labels` does.
  outer, out_def = jax.tree_util.tree_flatten_with_path(
    params, is_leaf=_is_variable
  )
  if [_paths.path_str(kp) for kp, _ in outer] != paths:
    out_def = treedef
  structs = [
    _struct(x, f'Parameter {path!r}')
    for path, (_, x) in zip(paths, flat, strict=True)
  ]
  shaped_params = jax.tree.unflatten(treedef, structs)

  inputs, in_def = jax.tree.flatten((args, kwargs))
  traced = [i for i, x in enumerate(inputs) if _is_arraylike(x)]
  arrays = [_struct(inputs[i], 'input') for i in traced]

  def call(p: Any, xs: list[Any]) -> Any:
    leaves = list(inputs)
    for i, x in zip(traced, xs, strict=True):
      leaves[i] = x
    a, kw = jax.tree.unflatten(in_def, leaves)
    return fn(p, *a, **kw)

  closed = jax.make_jaxpr(call)(shaped_params, arrays)
  num = len(structs)
  analysis = _Analysis(num)
  ins = [
    _Info(
      refs=frozenset(
        {_Ref(i, tuple(frozenset({a}) for a in range(len(s.shape))))}
      )
    )
    for i, s in enumerate(structs)
  ] + [_ACTIVATION] * len(arrays)
  outs = analysis.run(closed, ins)
  heads = frozenset().union(*(o.heads for o in outs))
  decided = [
    _decide(
      analysis.uses[i],
      analysis.experts[i],
      tuple(structs[i].shape),
      i in heads,
      head,
    )
    for i in range(num)
  ]
  return Routing(
    labels=jax.tree.unflatten(out_def, [d[0] for d in decided]),
    views=jax.tree.unflatten(out_def, [d[1] for d in decided]),
    reasons=jax.tree.unflatten(out_def, [d[2] for d in decided]),
    shapes=jax.tree.unflatten(out_def, structs),
  )
