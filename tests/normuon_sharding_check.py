"""`normuon` on 8 emulated devices, run in its own process.

Like tests/sharding_checks.py: the device count is fixed when jax starts,
so tests/test_normuon.py runs this file, which asks for 8 CPU devices
before any JAX use, in a process of its own and reads the JSON it prints. For each way a mesh reaches the optimizer (`explicit` and `auto`
axes with `jax.set_mesh`, `trap`: `device_put` parameters and a plain `jit`,
`mesh_arg`: `muon`'s `mesh=`; all by default, or those named on the command
line), two steps on FSDP-sharded parameters are compared with one device,
and the updates and NorMuon's `v` are checked to keep their shardings
without a second compile.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import muon_optax

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding
AxisType = jax.sharding.AxisType

# FSDP: every leaf split 8-way on an axis that has room: a dense kernel on
# its fan-in, a tall one on its fan-out, a conv kernel on its input
# channels, the stacked layers on the layer axis, the bias on its only axis.
SHAPES = {
  'w': ((64, 128), P('fsdp')),
  'tall': ((256, 16), P('fsdp')),
  'wide': ((32, 256), P(None, 'fsdp')),
  'conv': ((3, 3, 16, 32), P(None, None, 'fsdp')),
  'stack': ((8, 32, 64), P('fsdp')),
  'b': ((128,), P('fsdp')),
}
VIEWS = {'stack': muon_optax.MatrixView.dense()}
MATRICES = ('w', 'tall', 'wide', 'conv', 'stack')


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {
    k: jnp.asarray(rng.standard_normal(s), jnp.float32)
    for k, (s, _) in SHAPES.items()
  }


def _put(tree, mesh):
  return {
    k: jax.device_put(x, NamedSharding(mesh, SHAPES[k][1]))
    for k, x in tree.items()
  }


def _tx(mesh=None):
  return muon_optax.normuon(
    1e-2,
    weight_decay=0.1,
    b2=0.9,
    matrix_views=VIEWS,
    group_strategy='stack',
    mesh=mesh,
  )


def _v(state):
  return state.inner_states['muon'].inner_state[1].v


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _same(a, b):
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def _steps(tx, params, grads, init=None):
  """Runs `grads`; also says how often the second and later steps compiled."""
  state = state0 = (init or jax.jit(tx.init))(params)
  step = jax.jit(tx.update)
  updates, state = step(grads[0], state, params)
  compiled = step._cache_size()
  for g in grads[1:]:
    updates, state = step(g, state, params)
  return updates, state0, state, step._cache_size() - compiled


def check(mode, want):
  """`mode` on 8 devices against `want`, the one-device (updates, state)."""
  params = _tree(0)
  grads = [_tree(s + 1) for s in (0, 1)]
  kind = AxisType.Explicit if mode == 'explicit' else AxisType.Auto
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(kind,))
  p, gs = _put(params, mesh), [_put(g, mesh) for g in grads]
  if mode in ('explicit', 'auto'):
    with jax.set_mesh(mesh):
      updates, state0, state, recompiles = _steps(_tx(), p, gs)
  elif mode == 'trap':  # no mesh anywhere: eager init, plain jit
    tx = _tx()
    updates, state0, state, recompiles = _steps(tx, p, gs, init=tx.init)
  else:  # 'mesh_arg': muon's `mesh=`, no ambient mesh
    updates, state0, state, recompiles = _steps(_tx(mesh), p, gs)
  v0, v, v_want = _v(state0), _v(state), _v(want[1])
  return {
    'rel_err': max(_rel_err(updates[k], want[0][k]) for k in SHAPES),
    'v_rel_err': max(_rel_err(v[k], v_want[k]) for k in MATRICES),
    'updates_keep_sharding': all(_same(updates[k], p[k]) for k in SHAPES),
    'v_keeps_sharding': all(_same(v[k], v0[k]) for k in MATRICES),
    'recompiles': recompiles,
    'v_specs': {k: str(getattr(v[k].sharding, 'spec', '-')) for k in MATRICES},
  }


def main():
  if jax.device_count() < 8:
    raise SystemExit('needs 8 CPU devices: run this file as a script')
  modes = sys.argv[1:] or ['explicit', 'auto', 'trap', 'mesh_arg']
  updates, _, state, _ = _steps(_tx(), _tree(0), [_tree(1), _tree(2)])
  print(json.dumps({m: check(m, (updates, state)) for m in modes}, indent=1))


if __name__ == '__main__':
  # Before any JAX use: the device count is read when the backend starts.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', 8)
  main()
