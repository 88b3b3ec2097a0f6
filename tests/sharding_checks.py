"""Multi-device checks of `scale_by_muon`, run in their own process.

`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before jax
starts, which the rest of the test suite (one CPU device, same process) has
already done; `tests/test_sharding.py` therefore runs this file with
`python tests/sharding_checks.py` and reads the JSON it prints. Run it by hand
to see the equality errors and FLOP fractions per layout.
"""

from contextlib import nullcontext
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import muon_optax

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding
AxisType = jax.sharding.AxisType

# Small shapes for the equality checks: every kind of view (stacked, wide,
# tall, conv), a same-shape group not a multiple of 8 (`w_q` and the 8
# layers), and a left-over matrix large enough to be sharded inside its
# matmuls (`big`). Each layout below uses some of them.
SHAPES = {
  'layers': (8, 64, 64),
  'w_q': (64, 64),
  'w_in': (64, 256),
  'w_out': (256, 64),
  'big': (128, 512),
  'conv': (3, 3, 16, 32),
}

# Layouts, as a PartitionSpec per leaf over placeholder axes: 'A' is all the
# mesh axes (8-way), 'D' the data axis and 'M' the model axis of a (2, 4)
# mesh (on a 1-D mesh, 'M' is its axis and 'D' none).
LAYOUTS = {
  'data_parallel': {'layers': (), 'w_q': (), 'big': (), 'conv': ()},
  'fsdp_rows': {
    'layers': (None, 'A'),
    'w_in': ('A',),
    'big': ('A',),
    'conv': (None, None, 'A'),
  },
  'fsdp_cols': {
    'layers': (None, None, 'A'),
    'w_out': (None, 'A'),
    'big': (None, 'A'),
  },
  'tensor_parallel': {
    'layers': (None, None, 'M'),
    'w_in': (None, 'M'),
    'w_out': ('M', None),
    'big': ('D', 'M'),
  },
  'stacked': {'layers': ('A',), 'w_q': ()},
}


def _specs(layout, mesh):
  """The PartitionSpecs of `layout` on `mesh`."""
  names = mesh.axis_names
  axis = {
    'A': names if len(names) > 1 else names[0],
    'D': names[0] if len(names) > 1 else None,
    'M': names[-1],
    None: None,
  }
  return {k: P(*(axis[a] for a in v)) for k, v in LAYOUTS[layout].items()}


# The FLOP target's mixed tree: a stacked group of 8 layers plus single
# large matrices.
MIXED = {
  'layers': (8, 256, 256),
  'w_in': (256, 1024),
  'w_out': (1024, 256),
  'big': (512, 512),
}
MIXED_FSDP = {
  'layers': P('d', None, None),
  'w_in': P(None, 'd'),
  'w_out': P('d', None),
  'big': P('d', None),
}


def _tree(shapes, seed):
  rng = np.random.default_rng(seed)
  return {
    k: jnp.asarray(rng.standard_normal(s), jnp.float32)
    for k, s in shapes.items()
  }


def _put(tree, mesh, specs):
  def put(k, x):
    spec = tuple(specs.get(k, ()))
    spec = P(*spec, *(None,) * (x.ndim - len(spec)))
    return jax.device_put(x, NamedSharding(mesh, spec))

  return {k: put(k, x) for k, x in tree.items()}


def _views(layouts):
  # The stacked leaf is 8 layers of (in, out) matrices, not a conv kernel.
  dense = muon_optax.MatrixView.dense()
  return {
    name: {'layers': dense} for name in layouts if 'layers' in LAYOUTS[name]
  }


def _run(tx, params, grads):
  state = jax.jit(tx.init)(params)
  step = jax.jit(tx.update)
  for g in grads:
    updates, state = step(g, state, params)
  return updates, state, step


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _same_sharding(a, b):
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def _types(tree):
  return [str(jax.typeof(x)) for x in jax.tree.leaves(tree)]


def check_layouts(mode='explicit', layouts=tuple(LAYOUTS), steps=2):
  """Every layout at once, against the single-device run.

  One params tree holds a copy of `SHAPES` per layout, so a single compile
  covers them all (the same-shape matrices of different layouts share
  Newton–Schulz groups, as the layers of a real model would). `mode`:
  'explicit' (a (2, 4) mesh with explicit axes, `jax.set_mesh`), 'auto' (the
  same with auto axes) or 'mesh_arg' (a 1-D auto mesh passed as `mesh=`, no
  ambient mesh).
  """

  def tree(seed):
    return {
      name: _tree({k: SHAPES[k] for k in LAYOUTS[name]}, seed)
      for name in layouts
    }

  params = tree(0)
  grads = [tree(s + 1) for s in range(steps)]
  views = _views(layouts)
  tx = muon_optax.scale_by_muon(matrix_views=views, group_strategy='stack')
  ref, _, _ = _run(tx, params, grads)
  if mode == 'mesh_arg':
    mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Auto,))
  else:
    types = AxisType.Explicit if mode == 'explicit' else AxisType.Auto
    mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(types,) * 2)

  def put(tree):
    return {
      name: _put(sub, mesh, _specs(name, mesh)) for name, sub in tree.items()
    }

  p, gs = put(params), [put(g) for g in grads]
  if mode == 'explicit':
    init, update = jax.jit(tx.init), jax.jit(tx.update)
  else:
    # Auto axes: the types carry no shardings, so an auto-mode training loop
    # pins them at the jit boundary; what is checked is the values, that
    # the momentum agrees with that pinning and no step recompiles.
    if mode == 'mesh_arg':
      tx = muon_optax.scale_by_muon(
        matrix_views=views, group_strategy='stack', mesh=mesh
      )
    shardings = jax.tree.map(lambda x: x.sharding, p)
    state_shardings = muon_optax.MuonState(
      count=NamedSharding(mesh, P()), mu=shardings
    )
    init = jax.jit(tx.init, out_shardings=state_shardings)
    update = jax.jit(tx.update, out_shardings=(shardings, state_shardings))
  context = jax.set_mesh(mesh) if mode != 'mesh_arg' else nullcontext()
  with context:
    state0 = state = init(p)
    updates, state = update(gs[0], state, p)
    # The single-device reference ran the same function: count from here.
    compiled = update._cache_size()
    for g in gs[1:]:
      updates, state = update(g, state, p)
    _, state_next = update(gs[0], state, p)
  recompiles = update._cache_size() - compiled
  out = {'mode': mode, 'mesh': dict(mesh.shape)}
  for name in layouts:
    out[name] = {
      'rel_err': max(
        _rel_err(updates[name][k], ref[name][k]) for k in LAYOUTS[name]
      ),
      'updates_keep_sharding': all(
        _same_sharding(updates[name][k], p[name][k]) for k in LAYOUTS[name]
      ),
      'momentum_keeps_sharding': all(
        _same_sharding(state.mu[name][k], p[name][k]) for k in LAYOUTS[name]
      ),
    }
  out['state_types_kept'] = _types(state) == _types(state_next)
  out['init_and_update_state_types_equal'] = _types(state0) == _types(state)
  out['update_types_equal_grad_types'] = _types(updates) == _types(gs[0])
  out['recompiles'] = recompiles
  return out


def check_muon_alias():
  """`muon` (Muon + AdamW partition) on an FSDP layout, against one device."""
  shapes = {'w': (64, 128), 'b': (128,), 'stack': (8, 32, 64)}
  specs = {'w': P('fsdp'), 'b': P('fsdp'), 'stack': P(None, None, 'fsdp')}
  params = _tree(shapes, 0)
  grads = [_tree(shapes, s + 1) for s in range(2)]
  tx = muon_optax.muon(
    1e-2,
    weight_decay=0.1,
    matrix_views={'stack': muon_optax.MatrixView.dense()},
    group_strategy='stack',
  )
  ref, _, _ = _run(tx, params, grads)
  mesh = jax.make_mesh((8,), ('fsdp',))
  p = _put(params, mesh, specs)
  with jax.set_mesh(mesh):
    updates, _, _ = _run(tx, p, [_put(g, mesh, specs) for g in grads])
  return {
    'rel_err': max(_rel_err(updates[k], ref[k]) for k in ref),
    'updates_keep_sharding': all(_same_sharding(updates[k], p[k]) for k in p),
  }


def _flops(tx, params, mesh=None, specs=None):
  grads = params
  state = tx.init(params)
  if mesh is None:
    lowered = jax.jit(tx.update).lower(grads, state)
  else:
    with jax.set_mesh(mesh):
      lowered = jax.jit(tx.update).lower(grads, state)
  cost = lowered.compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost['flops'])


def check_flops():
  """Per-device FLOPs of one update, 8 devices over one, on `MIXED`."""
  params = _tree(MIXED, 0)
  tx = muon_optax.scale_by_muon(
    matrix_views={'layers': muon_optax.MatrixView.dense()},
    group_strategy='stack',
  )
  single = _flops(tx, params)
  mesh = jax.make_mesh((8,), ('d',))
  out = {'single_device_flops': single}
  for name, specs in (('replicated', {}), ('fsdp', MIXED_FSDP)):
    flops = _flops(tx, _put(params, mesh, specs), mesh, specs)
    out[name] = {'flops_per_device': flops, 'fraction': flops / single}
  return out


def check_trap():
  """`device_put` FSDP params, `jax.jit(tx.update)`, no mesh anywhere.

  Both kinds of mesh axes: with `jax.make_mesh`'s default (explicit) the
  updates' types carry the mesh and the work is split; with auto axes they
  carry none inside `jit`, and XLA partitions the update on its own.
  """
  params = _tree(MIXED, 0)
  grads = [_tree(MIXED, s + 1) for s in range(2)]
  views = {'layers': muon_optax.MatrixView.dense()}
  make = lambda: muon_optax.scale_by_muon(
    matrix_views=views, group_strategy='stack'
  )
  single = _flops(make(), params)
  ref_state, ref_step = make().init(params), jax.jit(make().update)
  want = []
  for g in grads:
    u, ref_state = ref_step(g, ref_state)
    want.append(u)
  out = {}
  for kind in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((8,), ('d',), axis_types=(kind,))
    p = _put(params, mesh, MIXED_FSDP)
    tx = make()
    state = tx.init(p)  # eagerly, as nnx.Optimizer and TrainState do
    step = jax.jit(tx.update)
    for g in grads:
      updates, state = step(_put(g, mesh, MIXED_FSDP), state)
    out[str(kind)] = {
      'rel_err': max(_rel_err(updates[k], want[-1][k]) for k in p),
      'updates_keep_sharding': all(_same_sharding(updates[k], p[k]) for k in p),
      'layers_spec': str(updates['layers'].sharding.spec),
      'fraction': _flops(make(), p) / single,
    }
  return out


def check_bf16():
  """bfloat16 Newton–Schulz on the sharded path, PyTorch layouts ((out, in)
  and OIHW views), FSDP on explicit mesh axes, against one float32 device."""
  shapes = {'fc': (128, 64), 'conv': (32, 16, 3, 3), 'sq': (64, 64)}
  out_in = muon_optax.MatrixView((-1,), (-2,))
  views = {
    'fc': out_in,
    'sq': out_in,
    'conv': muon_optax.MatrixView((-3, -2, -1), (-4,)),
  }
  specs = {'fc': P('d'), 'conv': P('d'), 'sq': P(None, 'd')}
  params = _tree(shapes, 0)
  grads = [_tree(shapes, s + 1) for s in range(2)]
  ref_tx = muon_optax.scale_by_muon(
    matrix_views=views, compute_dtype=jnp.float32
  )
  ref, _, _ = _run(ref_tx, params, grads)
  mesh = jax.make_mesh((8,), ('d',))
  out = {}
  for strategy in ('stack', 'unroll', 'map'):
    tx = muon_optax.scale_by_muon(
      matrix_views=views, compute_dtype=jnp.bfloat16, group_strategy=strategy
    )
    p = _put(params, mesh, specs)
    with jax.set_mesh(mesh):
      updates, _, _ = _run(tx, p, [_put(g, mesh, specs) for g in grads])
    out[strategy] = {
      'rel_err': max(_rel_err(updates[k], ref[k]) for k in ref),
      'updates_keep_sharding': all(_same_sharding(updates[k], p[k]) for k in p),
    }
  return out


def main():
  if jax.device_count() < 8:
    raise SystemExit(
      'needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8'
    )
  which = sys.argv[1:] or [
    'explicit',
    'auto',
    'mesh_arg',
    'alias',
    'flops',
    'trap',
    'bf16',
  ]
  checks = {
    'explicit': lambda: check_layouts('explicit'),
    'auto': lambda: check_layouts('auto'),
    'mesh_arg': lambda: check_layouts('mesh_arg'),
    'alias': check_muon_alias,
    'flops': check_flops,
    'trap': check_trap,
    'bf16': check_bf16,
  }
  print(json.dumps({k: checks[k]() for k in which}, indent=1))


if __name__ == '__main__':
  # Read when the backend starts (the first device query), not at import.
  flag = '--xla_force_host_platform_device_count=8'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {flag}'
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  main()
