"""Data-parallel + FSDP training of the Transformer example on 8 devices.

Run by `train_test.py` in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`; prints one JSON line:
the largest relative difference of the loss history from the one-device run,
and whether parameters and optimizer state keep their FSDP shardings.
"""

import dataclasses
import json
import pathlib
import sys

from flax import nnx
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import optimizers  # noqa: E402

from transformer import train  # noqa: E402

MESH = (2, 4)


def _config(mesh=None):
  return dataclasses.replace(
    train.tiny_config(),
    d_model=32,
    num_heads=2,
    context=16,
    batch_size=16,
    steps=6,
    eval_every=2,
    eval_windows=32,
    eval_batch_size=16,
    max_bytes=50_000,
    mesh=mesh,
  )


def _spec_axes(sharding):
  return tuple(a for a in sharding.spec if a is not None)


def check(optimizer: str) -> dict:
  """One run on one device, one on the (2, 4) mesh, and the layouts kept."""
  corpus = train.load_data(None, _config())
  lr = 1e-2
  single = train.train_and_evaluate(
    _config(), corpus, optimizer=optimizer, learning_rate=lr
  )
  sharded = train.train_and_evaluate(
    _config(MESH), corpus, optimizer=optimizer, learning_rate=lr
  )
  # What train_and_evaluate itself did with the mesh: every matrix (and
  # only with the mesh) ends sharded over fsdp.
  flat, _ = jax.tree_util.tree_flatten_with_path(
    nnx.state(train.make_model(_config()), nnx.Param)
  )
  ndim = {
    jax.tree_util.keystr(k, simple=True, separator='/'): x.ndim for k, x in flat
  }
  run_layouts = sharded['param_shardings']
  run_matrices_sharded = single['param_shardings'] is None and all(
    "'fsdp'" in run_layouts[path] for path, n in ndim.items() if n >= 2
  )
  keys = ('train_loss', 'val_loss')
  rel = max(
    abs(a[k] - b[k]) / abs(a[k])
    for a, b in zip(single['history'], sharded['history'], strict=True)
    for k in keys
  )

  # The layouts, step by step: the train step pins them, check they hold.
  config = _config(MESH)
  mesh = train.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    model = train.make_model(config)
    tx = optimizers.build(
      optimizer, model, config.steps, train.default_muon_config()
    )
    params = nnx.state(model, nnx.Param)
    lrs = optimizers.leaf_lrs(
      optimizer, model, params, lr, train.default_muon_config()
    )
    opt_state, (param_shardings, state_shardings) = train.shard(model, tx, mesh)
    step = train._train_step_fn(tx, (param_shardings, state_shardings))
    rng = np.random.default_rng(0)
    batch = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(('data', 'fsdp'))
    )
    for _ in range(2):
      x = rng.integers(0, 256, (config.batch_size, config.context), np.int32)
      x, y = jax.device_put((x, np.roll(x, -1, axis=1)), batch)
      opt_state, _ = step(model, opt_state, lrs, x, y)
    params = nnx.state(model, nnx.Param)

  def same(tree, shardings):
    leaves = jax.tree.leaves(tree)
    return all(
      leaf.sharding.is_equivalent_to(s, leaf.ndim)
      for leaf, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
    )

  matrices = [x for x in jax.tree.leaves(params) if x.ndim == 2]
  state_leaves = [x for x in jax.tree.leaves(opt_state) if x.ndim == 2]
  return {
    'optimizer': optimizer,
    'devices': jax.device_count(),
    'run_mesh': sharded['mesh'],
    'run_matrices_sharded': run_matrices_sharded,
    'rel_err': rel,
    'params_keep_sharding': same(params, param_shardings),
    'state_keeps_sharding': same(opt_state, state_shardings),
    'matrices_sharded': all(
      _spec_axes(x.sharding) == ('fsdp',) for x in matrices
    ),
    'state_matrices_sharded': all(
      _spec_axes(x.sharding) == ('fsdp',) for x in state_leaves
    ),
    'state_matrices': len(state_leaves),
  }


if __name__ == '__main__':
  for name in sys.argv[1:] or ['muon', 'adamw']:
    print(json.dumps(check(name)), flush=True)
