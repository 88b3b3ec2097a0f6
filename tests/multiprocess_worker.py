"""One of two JAX processes running a Muon update on a shared FSDP mesh.

`tests/test_multiprocess.py` starts two of these on this machine:

  python tests/multiprocess_worker.py PROCESS_ID PORT OUT_DIR

Each process gets 4 CPU devices and the gloo CPU collectives, joins the
other through `jax.distributed.initialize` (coordinator on 127.0.0.1:PORT),
and the 8 devices form one mesh. Parameters and gradients are sharded over
it (FSDP: each process holds half of every sharded leaf), a few updates of
`scale_by_muon` and of `muon` run with `mesh=`, and the global updates are
gathered to every process; process 0 writes them to OUT_DIR/updates.npz with
a summary in OUT_DIR/summary.json. The test compares them with the same
updates computed on one device (`make_inputs` and `TRANSFORMS` below are
what both sides use).

Exit status SKIP_CODE (with a line on stderr) means this jax cannot run the
gloo CPU collectives here, which the test reports as a skip.
"""

import json
import os
import pathlib
import sys
from typing import Any

import numpy as np

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
STEPS = 3
SKIP_CODE = 77  # automake's "skipped"

# A stacked (scanned) leaf sharded on its layer axis, a wide matrix sharded
# on its columns, a tall one on its rows, a replicated matrix and a bias.
SHAPES = {
  'layers': (8, 64, 64),
  'w_in': (64, 256),
  'w_out': (256, 64),
  'w_rep': (32, 32),
  'bias': (256,),
}
SPECS = {
  'layers': ('fsdp', None, None),
  'w_in': (None, 'fsdp'),
  'w_out': ('fsdp', None),
  'w_rep': (None, None),
  'bias': ('fsdp',),
}


def make_inputs(steps: int = STEPS) -> tuple[dict, list[dict]]:
  """Params and `steps` gradient trees, float32 NumPy, the same everywhere."""
  rng = np.random.default_rng(0)

  def tree(scale):
    return {
      k: (scale * rng.standard_normal(s)).astype(np.float32)
      for k, s in SHAPES.items()
    }

  return tree(0.02), [tree(1.0) for _ in range(steps)]


def _views():
  import muon_optax  # pylint: disable=import-outside-toplevel

  # The stacked leaf is 8 layers of (in, out) matrices, not a conv kernel.
  return {'layers': muon_optax.MatrixView.dense()}


def _scale_by_muon(mesh):
  import muon_optax  # pylint: disable=import-outside-toplevel

  return muon_optax.scale_by_muon(
    matrix_views=_views(), group_strategy='stack', mesh=mesh
  )


def _muon(mesh):
  import muon_optax  # pylint: disable=import-outside-toplevel

  return muon_optax.muon(
    learning_rate=1e-2,
    weight_decay=0.1,
    matrix_views=_views(),
    group_strategy='stack',
    mesh=mesh,
  )


# name -> (a function of the mesh or None giving the transformation, the
# leaves it updates): `scale_by_muon` takes matrices only, `muon` sends the
# bias to Adam.
TRANSFORMS = {
  'scale_by_muon': (_scale_by_muon, ('layers', 'w_in', 'w_out', 'w_rep')),
  'muon': (_muon, tuple(SHAPES)),
}


def run_updates(tx, params, grads, keys) -> list[Any]:
  """The updates of every step of `tx` on the `keys` leaves, jitted."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  params = {k: params[k] for k in keys}
  grads = [{k: g[k] for k in keys} for g in grads]
  state = jax.jit(tx.init)(params)
  step = jax.jit(tx.update)
  apply = jax.jit(optax.apply_updates)
  out = []
  for g in grads:
    updates, state = step(g, state, params)
    params = apply(params, updates)
    out.append(updates)
  return out


def _skip(why: str) -> None:
  print(f'SKIP: gloo CPU collectives unavailable: {why}', file=sys.stderr)
  sys.exit(SKIP_CODE)


def _start(process_id: int, port: int):
  import jax  # pylint: disable=import-outside-toplevel

  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except (AttributeError, ValueError) as e:
    _skip(f'jax {jax.__version__}: {e}')
  jax.config.update('jax_num_cpu_devices', LOCAL_DEVICES)
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=NUM_PROCESSES,
    process_id=process_id,
    initialization_timeout=60,
  )
  try:
    devices = jax.devices()  # the CPU client, with its collectives, starts
  except Exception as e:  # pylint: disable=broad-except
    if 'gloo' in str(e).lower():
      _skip(str(e))
    raise
  want = NUM_PROCESSES * LOCAL_DEVICES
  if len(devices) != want or jax.process_count() != NUM_PROCESSES:
    raise SystemExit(
      f'expected {want} devices in {NUM_PROCESSES} processes, got '
      f'{len(devices)} in {jax.process_count()}'
    )
  return jax


def main(process_id: int, port: int, out_dir: pathlib.Path) -> None:
  jax = _start(process_id, port)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh(
    (NUM_PROCESSES * LOCAL_DEVICES,),
    ('fsdp',),
    axis_types=(jax.sharding.AxisType.Auto,),
  )
  params_np, grads_np = make_inputs()

  def put(tree):
    # Every process holds the whole NumPy tree and gives each of its devices
    # its slice: the global arrays span both processes.
    def one(k, x):
      sharding = jax.sharding.NamedSharding(mesh, P(*SPECS[k]))
      return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    return {k: one(k, x) for k, x in tree.items()}

  params = put(params_np)
  grads = [put(g) for g in grads_np]
  arrays, summary = {}, {'devices': jax.device_count(), 'transforms': {}}
  for name, (make_tx, keys) in TRANSFORMS.items():
    steps = run_updates(make_tx(mesh), params, grads, keys)
    summary['transforms'][name] = {
      'updates_keep_sharding': all(
        u[k].sharding.is_equivalent_to(params[k].sharding, u[k].ndim)
        for u in steps
        for k in u
      ),
      'spans_processes': all(
        len({d.process_index for d in u[k].sharding.device_set})
        == NUM_PROCESSES
        for u in steps
        for k in u
      ),
    }
    for i, u in enumerate(steps):
      gathered = multihost_utils.process_allgather(u, tiled=True)
      for k, v in gathered.items():
        arrays[f'{name}/{i}/{k}'] = np.asarray(v)
  if process_id == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / 'updates.npz', **arrays)
    (out_dir / 'summary.json').write_text(json.dumps(summary))
  # Neither process leaves before the other has finished its collectives.
  multihost_utils.sync_global_devices('muon_optax multiprocess test done')


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  main(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
