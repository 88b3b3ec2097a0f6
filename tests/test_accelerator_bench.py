"""`benchmarks/accelerator.py --quick` runs and writes every section.

The benchmark is meant for a GPU; --quick shrinks it to run here on the CPU,
which checks that every section runs end to end and produces positive,
finite figures (the values themselves are measurements, not asserted).
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a subprocess running the whole benchmark

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'benchmarks' / 'accelerator.py'
TIMEOUT_S = 300
STRATEGIES = ('stack', 'unroll', 'map')
DTYPES = ('bfloat16', 'float32')


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp('accelerator')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), '--quick', '--out', str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return {
    'json': json.loads((out / 'accelerator_quick.json').read_text()),
    'md': (out / 'accelerator_quick.md').read_text(),
  }


def _numbers(tree, path=''):
  """(path, value) of every number in a JSON tree (bools excluded)."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _numbers(v, f'{path}/{k}')
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _numbers(v, f'{path}/{i}')
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, tree


def _assert_finite_positive(section, name):
  numbers = list(_numbers(section, name))
  assert numbers, f'{name} has no figures'
  for path, v in numbers:
    assert math.isfinite(v), (path, v)
    # Agreement between strategies may be exactly 0; everything else is a
    # time, a rate, a size, a ratio or an error, hence > 0.
    if not path.endswith('_diff'):
      assert v > 0, (path, v)


def test_meta(result):
  meta = result['json']['meta']
  assert meta['backend'] == 'cpu'  # JAX_PLATFORMS=cpu reached the script
  assert meta['device_kind']


@pytest.mark.parametrize(
  'section', ['peaks', 'newton_schulz', 'update', 'polar_error']
)
def test_section_has_finite_positive_figures(result, section):
  _assert_finite_positive(result['json'][section], section)


def test_peaks_and_newton_schulz_cover_both_dtypes(result):
  r = result['json']
  assert set(r['peaks']) == set(DTYPES)
  assert len(r['newton_schulz']) == 3
  for row in r['newton_schulz']:
    assert set(row['variants']) == set(DTYPES)
    for v in row['variants'].values():
      assert v['tflops'] == pytest.approx(row['flops'] / v['median_s'] / 1e12)


def test_update_times_every_strategy_and_the_peers(result):
  update = result['json']['update']
  assert len(update) == 2  # the GPT-like and the ResNet-like tree
  for u in update.values():
    want = {f'muon_optax[{s}]' for s in STRATEGIES}
    want |= {'optax.contrib.muon', 'optax.adamw'}
    assert set(u['variants']) == want
    assert u['tree']['muon_matrices'] > 0
    # The strategies time the same arithmetic.
    assert u['strategies_max_rel_diff'] < 1e-4
    # Each speedup is optax.contrib.muon's time over the variant's, from the
    # same interleaved run.
    optax_s = u['variants']['optax.contrib.muon']['median_s']
    for name, v in u['variants'].items():
      if name != 'optax.contrib.muon':
        assert v['speedup_vs_optax_muon'] == pytest.approx(
          optax_s / v['median_s'], rel=1e-6
        ), name


def test_polar_error_of_both_matrices_and_dtypes(result):
  rows = result['json']['polar_error']
  assert {r['matrix'] for r in rows} == {'gaussian', 'ill_conditioned'}
  for r in rows:
    assert set(r['rel_error_vs_svd_polar']) == set(DTYPES)
    # 5 Newton–Schulz steps approximate U·Vᵀ: an error well under 1.
    assert all(e < 1.0 for e in r['rel_error_vs_svd_polar'].values())
  cond = {r['matrix']: r['condition_number'] for r in rows}
  assert cond['ill_conditioned'] > 100 * cond['gaussian']


def test_markdown_summarizes_every_section(result):
  md = result['md']
  for heading in (
    '## Matmul peaks',
    '## Newton–Schulz',
    '## Full jitted update',
    '## Error against the SVD polar factor',
  ):
    assert heading in md
  assert 'optax.contrib.muon' in md
