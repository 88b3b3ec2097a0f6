"""Abstract interpretation of a jaxpr: how each parameter leaf is used.

`Analysis.run` follows every parameter leaf of a traced function through its
jaxpr (into `jit`, `scan`, `while`, `cond`, `remat`, `custom_jvp`/
`custom_vjp` and `shard_map` bodies) with an axis map, and records each
leaf's uses: a matmul operand with its contracted and free axes, a table
read by indexing or by a one-hot matmul, an elementwise operand. It also
records which matmuls feed another parameterised matmul, which reach the
outputs without one (the candidate heads), and which pairs of projections
meet in an attention score. `_trace.py` turns this into decisions.
"""

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
import dataclasses
from typing import Any

from jax.extend import core as jex
import numpy as np

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
class Ref:
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
class Info:
  """What the analysis knows about one value of the jaxpr.

  data: computed from the function's non-parameter inputs (activations).
  refs: the parameter leaves this value is a re-layout of.
  derived: leaves a parameter-only value was computed from (not a re-layout).
  heads: leaves whose matmul output reaches this value without passing
    through another parameterised matmul.
  tags: per axis, the (leaf, leaf axis) pairs of the weight fan-out axes that
    this activation axis comes from; None where not followed.
  iota: an `iota` (positions 0, 1, ...), moved about.
  onehot: a one-hot encoding of integer activations (`eq` against an iota,
    as `jax.nn.one_hot` computes it), moved about or converted.
  """

  data: bool = False
  refs: frozenset[Ref] = frozenset()
  derived: frozenset[int] = frozenset()
  heads: frozenset[int] = frozenset()
  tags: Tags | None = None
  iota: bool = False
  onehot: bool = False


_NOTHING = Info()
ACTIVATION = Info(data=True)


@dataclasses.dataclass(frozen=True)
class Use:
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


def _map_ref(ref: Ref, sources: Sequence[Sequence[int]]) -> Ref:
  axes = tuple(
    frozenset().union(*(ref.axes[j] for j in src)) for src in sources
  )
  return Ref(ref.leaf, axes)


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


def axes_text(axes: Sequence[int]) -> str:
  axes = sorted(axes)
  word = 'axis' if len(axes) == 1 else 'axes'
  return f'{word} {", ".join(map(str, axes))}'


class Analysis:
  """Abstract interpretation of a jaxpr over `Info` values."""

  def __init__(self, num_leaves: int):
    self.uses: list[set[Use]] = [set() for _ in range(num_leaves)]
    self.experts: list[set[int]] = [set() for _ in range(num_leaves)]
    # Leaves whose matmul result reaches another parameterised matmul.
    self.fed: set[int] = set()
    # {(leaf, leaf): (head axis, head axis)}: two projections whose outputs
    # meet in an attention score (contracted along their fan-outs, batched
    # along another fan-out axis of each: the heads).
    self.attention: dict[tuple[int, int], tuple[int, int]] = {}

  def use(self, info: Info, use: Use) -> None:
    for ref in info.refs:
      self.uses[ref.leaf].add(use)

  # -- jaxprs -----------------------------------------------------------

  def run(
    self, jaxpr: Any, ins: Sequence[Info], consts: Sequence[Info] = ()
  ) -> list[Info]:
    if isinstance(jaxpr, jex.ClosedJaxpr):
      consts = [ACTIVATION] * len(jaxpr.consts)
      jaxpr = jaxpr.jaxpr
    env: dict[Any, Info] = {}

    def read(v: Any) -> Info:
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

  def eqn(self, eqn: Any, ins: list[Info]) -> list[Info]:
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
    if name == 'iota':
      return [Info(iota=True)]
    if name == 'eq' and self._is_one_hot(eqn, ins):
      return [Info(data=True, onehot=True)]
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
          Use('unclassified', f'passed into `{name}`, which is not followed'),
        )
      return self.opaque(eqn, ins)
    return self.generic(eqn, ins)

  # -- ops on values ----------------------------------------------------

  @staticmethod
  def _is_one_hot(eqn: Any, ins: list[Info]) -> bool:
    """`eq` of integer activations against an iota: a one-hot encoding."""
    if len(ins) != 2:
      return False
    pairs = list(zip(eqn.invars, ins, strict=True))
    for (v, a), (_, b) in (pairs, pairs[::-1]):
      dtype = getattr(v.aval, 'dtype', None)
      integer = dtype is not None and np.issubdtype(dtype, np.integer)
      if a.data and integer and b.iota and not b.data:
        return True
    return False

  def opaque(self, eqn: Any, ins: Sequence[Info]) -> list[Info]:
    data = any(i.data for i in ins)
    heads = frozenset().union(*(i.heads for i in ins))
    derived = self._derived(ins) if not data else frozenset()
    return [Info(data, frozenset(), derived, heads) for _ in eqn.outvars]

  @staticmethod
  def _derived(ins: Iterable[Info]) -> frozenset[int]:
    out: set[int] = set()
    for info in ins:
      out |= info.derived
      out |= {r.leaf for r in info.refs}
    return frozenset(out)

  def generic(self, eqn: Any, ins: list[Info]) -> list[Info]:
    """Any op that computes with its operands (elementwise, reductions...)."""
    name = eqn.primitive.name
    out_shape = _shape(eqn.outvars[0]) if eqn.outvars else ()
    for v, info in zip(eqn.invars, ins, strict=True):
      if info.refs:
        shape = _shape(v)
        elementwise = len(eqn.outvars) == 1 and _broadcasts(shape, out_shape)
        self.use(info, Use('elementwise' if elementwise else 'other', name))
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

  def structural(self, eqn: Any, ins: list[Info]) -> list[Info]:
    name = eqn.primitive.name
    if name in ('optimization_barrier', 'device_put'):
      return list(ins[: len(eqn.outvars)])
    # Concatenate moves every operand; the others move operand 0 (pad's
    # second operand is its padding value).
    moved = list(ins) if name == 'concatenate' else [ins[0]]
    sources = _structural_sources(eqn)
    data = any(i.data for i in ins)
    heads = frozenset().union(*(i.heads for i in ins))
    if name == 'stop_gradient':
      heads = frozenset()  # no gradient flows back: nothing downstream
    tags = _union_tags(
      len(sources), [_map_tags(i.tags, sources) for i in moved]
    )
    if data:
      for info in moved:
        self.use(info, Use('elementwise', name))
      onehot = all(i.onehot for i in moved)
      return [Info(True, frozenset(), frozenset(), heads, tags, onehot=onehot)]
    refs = frozenset(_map_ref(r, sources) for i in moved for r in i.refs)
    derived = frozenset().union(*(i.derived for i in ins))
    iota = all(i.iota for i in moved)
    return [Info(False, refs, derived, heads, tags, iota=iota)]

  def indexing(self, eqn: Any, ins: list[Info]) -> list[Info]:
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
      self.use(info, Use('index', name))
    return self.opaque(eqn, ins)

  def _heads(self, lhs: Info, rhs: Info) -> frozenset[int]:
    """The heads of a matmul-like op's output.

    An op with a parameter operand (a re-layout or not) against activations
    is a parameterised matmul: its output starts afresh from its own leaves,
    and the matmuls whose results reach its activation operand feed it (they
    are not heads, whatever else they reach).
    """
    own: set[int] = set()
    for side, other in ((lhs, rhs), (rhs, lhs)):
      params = {r.leaf for r in side.refs} | side.derived
      if other.data and not side.data and params:
        own |= params
        self.fed |= other.heads
    return frozenset(own) if own else lhs.heads | rhs.heads

  def _param_side(self, side: Info, other: Info, name: str) -> bool:
    """Records a matmul-like op's non-matmul uses; True if a weight use."""
    if side.refs and other.data:
      return True
    if side.refs:
      self.use(side, Use('indirect', f'{name} with no activation operand'))
    elif side.derived and not side.data and other.data:
      for leaf in side.derived:
        self.uses[leaf].add(
          Use('indirect', f'{name} operand only after non-layout ops')
        )
    return False

  def _matmul_use(
    self,
    ref: Ref,
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
        Use(
          'unclassified',
          f'{name} operand whose axis map is ambiguous (leaf '
          f'{axes_text(mixed)} both contracted and kept after a reshape)',
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
      Use(
        'matmul',
        name,
        frozenset(a for a, r in roles.items() if r == {'r'}),
        frozenset(a for a, r in roles.items() if r == {'o'}),
        layout,
        depthwise,
        groups,
      )
    )

  def dot_general(self, eqn: Any, ins: list[Info]) -> Info:
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    lnd, rnd = len(_shape(eqn.invars[0])), len(_shape(eqn.invars[1]))
    lfree = [i for i in range(lnd) if i not in lc and i not in lb]
    rfree = [i for i in range(rnd) if i not in rc and i not in rb]
    if lhs.onehot or rhs.onehot:
      table, ids = (rhs, lhs) if lhs.onehot else (lhs, rhs)
      if table.refs or table.derived:
        # A one-hot of integer inputs times a table: an embedding lookup.
        for leaf in {r.leaf for r in table.refs} | table.derived:
          self.uses[leaf].add(Use('index', 'one-hot dot_general'))
        data = lhs.data or rhs.data
        return Info(data, heads=lhs.heads | rhs.heads)
    if lhs.data and rhs.data and not (lhs.refs or rhs.refs):
      self._attention(lhs, rhs, lc, rc, lb, rb)
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

    def side_tags(side: Info, axes: Sequence[int], nd: int, weight: bool):
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
    return Info(data, frozenset(), derived, self._heads(lhs, rhs), tags)

  def _attention(self, lhs: Info, rhs: Info, lc, rc, lb, rb) -> None:
    """Records two projections whose outputs meet as an attention score:
    each side's contracted axes come from one weight's fan-out, and a batch
    axis of each from another fan-out axis of that weight (the heads)."""
    if lhs.tags is None or rhs.tags is None:
      return

    def single(tags: Tags, axes: Sequence[int]) -> int | None:
      leaves = {leaf for a in axes for leaf, _ in tags[a]}
      return next(iter(leaves)) if len(leaves) == 1 and axes else None

    q, k = single(lhs.tags, lc), single(rhs.tags, rc)
    if q is None or k is None or q == k:
      return
    for a, b in zip(lb, rb, strict=True):
      q_heads = {ax for leaf, ax in lhs.tags[a] if leaf == q}
      k_heads = {ax for leaf, ax in rhs.tags[b] if leaf == k}
      if len(q_heads) == 1 and len(k_heads) == 1:
        self.attention[(q, k)] = (q_heads.pop(), k_heads.pop())
        return

  def conv(self, eqn: Any, ins: list[Info]) -> Info:
    lhs, rhs = ins[:2]
    dn = eqn.params['dimension_numbers']
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    groups = eqn.params.get('feature_group_count', 1)
    batch_groups = eqn.params.get('batch_group_count', 1)
    if self._param_side(lhs, rhs, 'conv_general_dilated'):
      self.use(lhs, Use('unclassified', 'input (not kernel) of a conv'))
    weight = self._param_side(rhs, lhs, 'conv_general_dilated')
    if weight and batch_groups != 1:
      self.use(
        rhs,
        Use(
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
    return Info(data, frozenset(), derived, self._heads(lhs, rhs), tuple(tags))

  # -- control flow -----------------------------------------------------

  def join(self, a: Info, b: Info) -> Info:
    data = a.data or b.data
    refs = a.refs | b.refs
    if data and refs:
      for ref in refs:
        self.uses[ref.leaf].add(
          Use('unclassified', 'carried through a loop with activations')
        )
      refs = frozenset()
    if a.tags is None or b.tags is None or len(a.tags) != len(b.tags):
      tags = a.tags if b.tags is None else b.tags
    else:
      tags = tuple(x | y for x, y in zip(a.tags, b.tags, strict=True))
    derived = frozenset() if data else a.derived | b.derived
    return Info(data, refs, derived, a.heads | b.heads, tags)

  def _fixed_point(
    self,
    body: Callable[[list[Info]], list[Info]],
    carry: list[Info],
    what: str,
  ) -> tuple[list[Info], list[Info]]:
    for _ in range(_MAX_FIXED_POINT):
      outs = body(carry)
      new = [self.join(c, o) for c, o in zip(carry, outs, strict=False)]
      if new == carry:
        return carry, outs
      carry = new
    raise RuntimeError(f'trace_routing: the {what} carry analysis diverged.')

  def scan(self, eqn: Any, ins: list[Info]) -> list[Info]:
    p = eqn.params
    nc, ncar = p['num_consts'], p['num_carry']
    consts, carry, xs = ins[:nc], list(ins[nc : nc + ncar]), ins[nc + ncar :]

    def sliced(info: Info) -> Info:
      refs = frozenset(Ref(r.leaf, r.axes[1:]) for r in info.refs)
      tags = info.tags[1:] if info.tags else None
      return dataclasses.replace(info, refs=refs, tags=tags)

    def stacked(info: Info) -> Info:
      refs = frozenset(Ref(r.leaf, (frozenset(),) + r.axes) for r in info.refs)
      tags = (frozenset(),) + info.tags if info.tags is not None else None
      return dataclasses.replace(info, refs=refs, tags=tags)

    xs = [sliced(x) for x in xs]
    carry, outs = self._fixed_point(
      lambda c: self.run(p['jaxpr'], [*consts, *c, *xs]), carry, 'scan'
    )
    return carry + [stacked(y) for y in outs[ncar:]]

  def while_loop(self, eqn: Any, ins: list[Info]) -> list[Info]:
    p = eqn.params
    cn, bn = p['cond_nconsts'], p['body_nconsts']
    cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], list(ins[cn + bn :])

    def body(c: list[Info]) -> list[Info]:
      self.run(p['cond_jaxpr'], [*cconsts, *c])
      return self.run(p['body_jaxpr'], [*bconsts, *c])

    carry, _ = self._fixed_point(body, carry, 'while')
    return carry

  def cond(self, eqn: Any, ins: list[Info]) -> list[Info]:
    outs = None
    for branch in eqn.params['branches']:
      res = self.run(branch, ins[1:])
      outs = (
        res
        if outs is None
        else [self.join(a, b) for a, b in zip(outs, res, strict=True)]
      )
    return outs or []
