"""`compare.main` end to end on a tiny config: results.json has the schema."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import compare  # noqa: E402


def test_convnet_end_to_end(tmp_path):
  compare.main(
    [
      '--epochs=1',
      '--train-size=128',
      '--seeds=2',
      '--optimizers=muon,adamw',
      '--lr-grid',
      'muon=0.05,0.1',
      'adamw=3e-3',
      '--out',
      str(tmp_path),
      '--no-progress',
      '--diagnostics',
    ]
  )
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['task'] == 'convnet'
  assert results['data'] == 'sklearn digits'
  assert len(results['runs']) == 4
  for run in results['runs']:
    assert set(run) >= {
      'optimizer',
      'seed',
      'learning_rate',
      'final',
      'history',
    }
    assert 'test_accuracy' in run['final']
    for h in run['history']:
      assert set(h) >= {'step', 'epoch', 'wall_time', 'train_loss'}
      assert 'val_accuracy' in h
  assert [len(v) for v in results['tuning'].values()] == [2, 1]
  assert (tmp_path / 'summary.md').exists()
  assert (tmp_path / 'val_accuracy_vs_step.png').exists()
  assert (tmp_path / 'val_accuracy_vs_time.png').exists()
  # --diagnostics: the routing table, per-layer metrics and their plot.
  assert 'muon' in (tmp_path / 'routing.txt').read_text()
  muon_run = next(r for r in results['runs'] if r['optimizer'] == 'muon')
  layers = muon_run['history'][-1]['layers']
  assert layers and all(
    0.0 < m['orthogonality_error'] < 1.0 and m['update_to_weight_rms'] > 0.0
    for m in layers.values()
  )
  assert (tmp_path / 'layer_metrics.png').exists()


def test_transformer_end_to_end(tmp_path):
  compare.main(
    [
      '--task=transformer',
      '--steps=4',
      '--seeds=2',
      '--optimizers=muon,adamw',
      '--lr-grid',
      'muon=0.01',
      'adamw=0.01',
      '--set',
      'd_model=16',
      'context=16',
      'batch_size=4',
      'eval_every=2',
      'eval_windows=8',
      'max_bytes=20000',
      '--out',
      str(tmp_path),
      '--no-progress',
    ]
  )
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['task'] == 'transformer'
  assert len(results['runs']) == 4
  for run in results['runs']:
    assert set(run['final']) == {'val_loss'}
    assert [h['step'] for h in run['history']] == [2, 4]
    assert all('val_loss' in h for h in run['history'])
  assert (tmp_path / 'val_loss_vs_time.png').exists()


@pytest.mark.parametrize(
  'argv, match',
  [
    (['--mesh', '2,4'], '--mesh is for --task transformer'),
    (['--task', 'transformer', '--mesh', '8'], '--mesh takes DATA,FSDP'),
    (['--task', 'transformer', '--mesh', 'a,b'], '--mesh takes DATA,FSDP'),
    (['--task', 'transformer', '--set', 'mesh=2,4'], 'Use --mesh'),
  ],
)
def test_bad_mesh_arguments(argv, match):
  with pytest.raises(SystemExit, match=match):
    compare.main(argv)


def _partial_run(optimizer, seed, lr, steps, val):
  return {
    'optimizer': optimizer,
    'seed': seed,
    'learning_rate': lr,
    'total_steps': steps,
    'final': {'val_loss': val},
    'history': [{'step': steps, 'epoch': 1.0, 'val_loss': val}],
  }


def test_merge_picks_the_best_seed0_lr_of_each_search(tmp_path):
  import argparse
  import math

  from transformer import train

  full_grid = tmp_path / 'a'  # muon tuned at the full budget (100 steps)
  short_grid = tmp_path / 'b'  # adamw searched on 40 steps, then seeds
  lines = {
    full_grid: [
      _partial_run('muon', 0, 0.01, 100, 2.5),
      _partial_run('muon', 0, 0.02, 100, 2.1),
      _partial_run('muon', 0, 0.04, 100, math.nan),
      _partial_run('muon', 1, 0.02, 100, 2.2),
    ],
    short_grid: [
      _partial_run('adamw', 0, 0.01, 40, 2.9),
      _partial_run('adamw', 0, 0.003, 40, 3.1),
      _partial_run('adamw', 0, 0.01, 100, 2.6),
      _partial_run('adamw', 1, 0.01, 100, 2.7),
    ],
  }
  for d, runs in lines.items():
    d.mkdir()
    (d / 'runs.partial.jsonl').write_text(
      '\n'.join(json.dumps(r) for r in runs) + '\n'
    )
  args = argparse.Namespace(
    merge=[str(full_grid), str(short_grid)], task='transformer', data=None
  )
  results = compare.merge(args, train)
  assert results['chosen_lr'] == {'muon': 0.02, 'adamw': 0.01}
  picked = [
    (r['optimizer'], r['seed'], r['learning_rate']) for r in results['runs']
  ]
  assert picked == [
    ('muon', 0, 0.02),
    ('muon', 1, 0.02),
    ('adamw', 0, 0.01),
    ('adamw', 1, 0.01),
  ]
  assert dict(results['tuning']['adamw']) == {0.01: 2.9, 0.003: 3.1}
