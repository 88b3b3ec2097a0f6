"""Routing read from a model's computation: how each parameter is used.

`trace_routing` traces the model's function abstractly (`jax.make_jaxpr`: no
FLOPs run, nothing is compiled), follows every parameter through the jaxpr
(`_jaxpr.Analysis`) and decides each leaf by its uses. A parameter that is
a kernel of a convolution, or an operand of a `dot_general` against
activations, is a weight matrix; one read by indexing or by a one-hot matmul
is an embedding; one used only elementwise is a bias, a scale or a token.
The matrix view comes from the op itself: the contracted axes are the
fan-in, whatever the layout, so PyTorch-style `(out, in)` and OIHW kernels,
attention projections with head axes and stacked (scanned) layers need no
naming convention.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from muon_optax import _jaxpr
from muon_optax import _paths
from muon_optax import _routing
from muon_optax._routing import HEAD
from muon_optax._routing import MATRIX
from muon_optax._routing import OTHER
from muon_optax._routing import Decision
from muon_optax._views import MatrixView


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
  uses: set[_jaxpr.Use], experts: set[int], shape: tuple[int, ...], head: bool
) -> Decision:
  """What a leaf is, from its uses in the jaxpr."""
  by_kind: dict[str, list[_jaxpr.Use]] = {}
  for u in sorted(uses, key=lambda u: (u.kind, u.what)):
    by_kind.setdefault(u.kind, []).append(u)
  matmuls = by_kind.get('matmul', [])
  if 'index' in by_kind:
    why = f'{by_kind["index"][0].what} (embedding)'
    if matmuls:
      why += '; also a matmul operand (tied output head)'
    return Decision(OTHER, None, why)
  if 'unclassified' in by_kind:
    whys = sorted({u.what for u in by_kind['unclassified']})
    return Decision(OTHER, None, 'unclassified: ' + '; '.join(whys))
  if matmuls:
    found = {(u.reduction, u.output) for u in matmuls}
    if len(found) > 1:
      text = ' vs '.join(
        f'({",".join(map(str, sorted(r)))})->({",".join(map(str, sorted(o)))})'
        for r, o in sorted(found, key=lambda v: (sorted(v[0]), sorted(v[1])))
      )
      why = f'conflicting uses: reduction->output axes {text}'
      return Decision(OTHER, None, why)
    reduction, output = next(iter(found))
    moved = output & experts
    if moved and output - moved:
      output = output - moved
    else:
      moved = frozenset()
    if not reduction or not output:
      missing = 'contracted' if not reduction else 'free'
      why = f'{matmuls[0].what} operand with no {missing} axis (a vector)'
      return Decision(OTHER, None, why)
    nd = len(shape)
    view = MatrixView(
      tuple(a - nd for a in sorted(reduction)),
      tuple(a - nd for a in sorted(output)),
    )
    resolved = view.resolve(shape)
    use = matmuls[0]
    conv = use.what == 'conv_general_dilated'
    if conv:
      dims = 'x'.join(str(shape[a]) for a in sorted(reduction))
      layout = f' ({use.conv_layout})' if use.conv_layout else ''
      kind = 'depthwise conv kernel' if use.depthwise else 'conv kernel'
      why = f'{kind}{layout} {dims} -> {resolved.describe()}'
      if use.groups > 1:
        why += f', {use.groups} groups'
    else:
      why = (
        f'dot_general operand, contracts {_jaxpr.axes_text(reduction)} -> '
        f'{resolved.describe()}'
      )
    if moved:
      why += f' (expert {_jaxpr.axes_text(moved)} as batch)'
    if any(u.depthwise for u in matmuls):
      return Decision(OTHER, view, why, conv=conv)
    if head:
      why = f'reaches the output with no matmul after it; {why}'
      return Decision(HEAD, view, why, conv=conv)
    return Decision(MATRIX, view, why, conv=conv)
  if 'indirect' in by_kind:
    whys = sorted({u.what for u in by_kind['indirect']})
    return Decision(OTHER, None, 'unclassified: ' + '; '.join(whys))
  if 'other' in by_kind:
    prims = sorted(
      {u.what for u in by_kind['other'] + by_kind.get('elementwise', [])}
    )
    return Decision(OTHER, None, f'no matmul use (used by {", ".join(prims)})')
  if 'elementwise' in by_kind:
    return Decision(OTHER, None, 'elementwise only')
  return Decision(OTHER, None, 'unused')


def _common_prefix(a: str, b: str) -> str:
  parts = []
  for x, y in zip(a.split('/'), b.split('/'), strict=False):
    if x != y:
      break
    parts.append(x)
  return '/'.join(parts)


def trace_routing(
  fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> _routing.Routing:
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
  - read by indexing (`gather`, `dynamic_slice` at data positions, scatter)
    or by a matmul against a one-hot of integer inputs (`jax.nn.one_hot`,
    Haiku's `lookup_style='ONE_HOT'`): an embedding, Adam, also when it is
    reused as a tied output head;
  - the output head: a matmul whose result reaches an output and never
    another parameterised matmul (through any path, `stop_gradient` aside):
    Adam (`route(routing, head='muon')` keeps it on Muon);
  - used only elementwise (biases, norm scales, added position embeddings,
    class tokens), or unused: Adam.

  So a training step's extra outputs route like its predictions: a
  BatchNorm step returning `(logits, new_batch_stats)`, a loss returning
  `(loss, aux)` or a backbone returning hidden states marks as heads only
  the matmuls whose results feed no later layer. A hidden state reached by
  several such matrices (a residual stream) is warned about, as is any
  routing that looks wrong (see `route`).

  A value is followed through reshape, transpose, broadcast, squeeze, slice,
  concatenate and dtype conversions with an axis map (which of the leaf's
  axes each axis is), so a transposed or reshaped kernel still maps its
  contracted axes back to the leaf's. Leaves used in conflicting ways, whose
  axis map a reshape made ambiguous, or that flow somewhere the analysis does
  not follow, go to Adam with a reason that says so. Matrices with a side
  under 4 or an aspect ratio over 128 go to Adam ('degenerate').

  Every keyword argument goes to `fn`: `trace_routing` has no options of its
  own. Finish the result with `muon_optax.route(routing, head=...,
  overrides=..., view_overrides=..., min_side=..., max_aspect=...)`.

  One line per library (x: an input batch; params, state and x may be
  arrays or `jax.ShapeDtypeStruct`s; docs/routing.md runs each):

  - Flax Linen with BatchNorm: `trace_routing(lambda p, s, x: model.apply(
    {'params': p, 'batch_stats': s}, x, train=True,
    mutable=['batch_stats']), params, stats, x)`
  - Flax NNX: `graphdef, state, rest = nnx.split(model, nnx.Param, ...)`;
    `trace_routing(lambda s, r, x: nnx.merge(graphdef, s, r)(x), state,
    rest, x)`
  - Equinox: `params, static = eqx.partition(model, eqx.is_inexact_array)`;
    `trace_routing(lambda p, x: eqx.combine(p, static)(x), params, x)`
  - Haiku: `f = hk.transform_with_state(forward)`;
    `trace_routing(lambda p, s, x: f.apply(p, s, None, x, True), params,
    state, x)`
  - keras 3 (JAX backend): `names = [v.path for v in
    model.trainable_variables]`; `trace_routing(lambda p, s, x:
    model.stateless_call([p[n] for n in names], s, x, training=True),
    dict(zip(names, [v.value for v in model.trainable_variables])),
    [v.value for v in model.non_trainable_variables], x)`
  - penzai: `unbound, frozen = pz.unbind_params(model, freeze=True)`;
    `trace_routing(lambda p, x: pz.bind_variables(unbound,
    [pz.ParameterValue(value=v, label=k) for k, v in p.items()])(x),
    {p.label: p.value for p in frozen}, x)`
  - plain JAX: `trace_routing(loss_fn, params, batch)`

  Args:
    fn: the model's function, called as `fn(params, *args, **kwargs)`.
    params: a pytree of arrays or `jax.ShapeDtypeStruct`s (a dict, an NNX
      State, an Equinox module).
    *args: the other inputs; array leaves (or `jax.ShapeDtypeStruct`s) are
      traced, any other leaf (a flag, a Python number) is passed as is.
    **kwargs: keyword inputs of `fn`, treated as `args`.

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
  if not callable(fn):
    raise TypeError(f'`fn` must be callable, got {type(fn).__name__}.')
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [_paths.path_str(kp) for kp, _ in flat]
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
  analysis = _jaxpr.Analysis(num)
  ins = [
    _jaxpr.Info(
      refs=frozenset(
        {_jaxpr.Ref(i, tuple(frozenset({a}) for a in range(len(s.shape))))}
      )
    )
    for i, s in enumerate(structs)
  ] + [_jaxpr.ACTIVATION] * len(arrays)
  outs = analysis.run(closed, ins)
  heads = frozenset().union(*(o.heads for o in outs)) - analysis.fed
  decisions = {
    path: _decide(
      analysis.uses[i], analysis.experts[i], tuple(structs[i].shape), i in heads
    )
    for i, path in enumerate(paths)
  }
  notes = []
  for k, out in enumerate(outs):
    for axis in out.tags or ():
      writers = {leaf for leaf, _ in axis}
      last = sorted(writers & heads)
      if last and len(writers) > 1:
        # A head's output summed with other matrices' outputs: not logits
        # but a residual stream (a hidden state, a backbone's features).
        names = ', '.join(repr(paths[i]) for i in last[:8])
        notes.append(
          f'Output {k} of the traced function sums the outputs of '
          f'{len(writers)} matrices: a residual stream or hidden state, not '
          f'predictions. Its last writers, which feed no later layer '
          f'({names}), are marked as output heads (Adam). Trace a function '
          'that returns predictions or a loss, or finish with `route('
          "routing, head='muon')`."
        )
        break
  attention = {}
  for (q, k), (q_axis, k_axis) in sorted(analysis.attention.items()):
    if structs[k].shape[k_axis] > structs[q].shape[q_axis]:
      q, k = k, q  # the query side has the most heads (grouped queries)
    attention[_common_prefix(paths[q], paths[k])] = (paths[q], paths[k])
  source = _routing.Source(
    'trace',
    _paths.path_tree(params),
    dict(zip(paths, structs, strict=True)),
    decisions,
    attention,
    tuple(notes),
  )
  return _routing.finish(source)
