"""Muon on a mesh spanning two JAX processes equals the one-device update.

Two processes of `tests/multiprocess_worker.py` (4 CPU devices each, gloo
collectives, `jax.distributed.initialize` on a local port) run
`scale_by_muon` and `muon` with `mesh=` on an 8-device FSDP mesh; their
gathered updates are compared with the same transformations run here on one
device. Skipped where this jax has no gloo CPU collectives; the children are
killed if they outlast `TIMEOUT_S`.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import multiprocess_worker as worker

pytestmark = pytest.mark.slow  # two gloo processes

SCRIPT = pathlib.Path(worker.__file__)
ROOT = SCRIPT.parent.parent
TIMEOUT_S = 120
RTOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  env = dict(os.environ)
  # The worker sets its own device count; a forced count would fight it.
  flags = env.get('XLA_FLAGS', '').split()
  env['XLA_FLAGS'] = ' '.join(
    f for f in flags if 'xla_force_host_platform_device_count' not in f
  )
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
    p for p in (str(ROOT), env.get('PYTHONPATH')) if p
  )
  return env


def _run_workers(out_dir: pathlib.Path) -> list[tuple[int, str]]:
  """Runs both processes; (returncode, stderr) of each.

  When one fails the other is killed at once (it would wait for its peer's
  collectives); both are killed if they outlast `TIMEOUT_S`.
  """
  port = _free_port()
  logs = [out_dir / f'stderr_{i}.txt' for i in range(worker.NUM_PROCESSES)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with log.open('w') as f:
        procs.append(
          subprocess.Popen(
            [sys.executable, str(SCRIPT), str(i), str(port), str(out_dir)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=f,
          )
        )
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      if time.monotonic() > deadline:
        pytest.fail(f'the two worker processes outlasted {TIMEOUT_S} s')
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return [
    (p.returncode, log.read_text()) for p, log in zip(procs, logs, strict=True)
  ]


@pytest.fixture(scope='module')
def distributed(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp('multiprocess')
  t0 = time.perf_counter()
  results = _run_workers(out_dir)
  wall_s = time.perf_counter() - t0
  for code, stderr in results:
    if code == worker.SKIP_CODE:
      pytest.skip(stderr.strip().splitlines()[-1])
  failed = [
    f'process {i} exited with {code} (-9: killed after the other '
    f'failed):\n{stderr[-3000:]}'
    for i, (code, stderr) in enumerate(results)
    if code != 0
  ]
  assert not failed, '\n'.join(failed)
  summary = json.loads((out_dir / 'summary.json').read_text())
  with np.load(out_dir / 'updates.npz') as f:
    updates = dict(f)
  return {'summary': summary, 'updates': updates, 'wall_s': wall_s}


@pytest.fixture(scope='module')
def reference():
  params, grads = worker.make_inputs()
  params = jax.tree.map(jax.numpy.asarray, params)
  grads = [jax.tree.map(jax.numpy.asarray, g) for g in grads]
  out = {}
  for name, (make_tx, keys) in worker.TRANSFORMS.items():
    steps = worker.run_updates(make_tx(None), params, grads, keys)
    for i, u in enumerate(steps):
      for k, v in u.items():
        out[f'{name}/{i}/{k}'] = np.asarray(v)
  return out


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_two_processes_make_one_mesh(distributed):
  summary = distributed['summary']
  assert summary['devices'] == worker.NUM_PROCESSES * worker.LOCAL_DEVICES
  for name, r in summary['transforms'].items():
    assert r['spans_processes'], name
    assert r['updates_keep_sharding'], name


@pytest.mark.parametrize('name', list(worker.TRANSFORMS))
def test_equals_single_device(distributed, reference, name):
  keys = [k for k in reference if k.startswith(f'{name}/')]
  assert len(keys) == worker.STEPS * len(worker.TRANSFORMS[name][1])
  got = distributed['updates']
  errors = {k: _rel_err(got[k], reference[k]) for k in keys}
  worst = max(errors, key=errors.get)
  print(
    f'{name}: max relative difference {errors[worst]:.2e} ({worst}); '
    f'two processes ran in {distributed["wall_s"]:.1f} s'
  )
  assert errors[worst] < RTOL, errors
  for k in keys:  # every leaf moved: nothing compared is trivially zero
    assert np.max(np.abs(reference[k])) > 0, k
