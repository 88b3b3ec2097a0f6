"""The harness (`compare.py`) end to end on tiny configs, and the summary's
figures."""

import argparse
import json
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from harness import analysis  # noqa: E402
from harness import cli  # noqa: E402
from harness import merge  # noqa: E402
from harness import report  # noqa: E402


@pytest.mark.slow
def test_convnet_end_to_end(tmp_path):
  # The tiny config of convnet/train_test.py: its compilations are reused.
  cli.main(
    [
      '--epochs=1',
      '--train-size=256',
      '--seeds=2',
      '--optimizers=adamw',
      '--variant',
      'muon_beta0.6=muon:beta=0.6',
      '--lr-grid',
      'adamw=0.01,0.03',
      'muon_beta0.6=0.01',
      '--set',
      'widths=4,8',
      '--out',
      str(tmp_path),
      '--no-progress',
      '--diagnostics',
    ]
  )
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['task'] == 'convnet'
  assert results['data'] == 'sklearn digits'
  assert results['rows']['muon_beta0.6'] == {
    'optimizer': 'muon',
    'kwargs': {'beta': 0.6, 'diagnostics': True},
  }
  names = [(r['name'], r['seed']) for r in results['runs']]
  assert names == [(n, s) for n in ('adamw', 'muon_beta0.6') for s in (0, 1)]
  for run in results['runs']:
    assert {'test_accuracy', 'val_accuracy'} <= set(run['final'])
    for h in run['history']:
      assert set(h) >= {'step', 'epoch', 'wall_time', 'val_accuracy'}
  assert [len(v) for v in results['tuning'].values()] == [2, 1]
  analysis = results['analysis']
  assert analysis['final_key'] == 'test_accuracy'
  assert list(analysis['reach']) == ['muon_beta0.6']
  assert analysis['table']['adamw']['step_time_vs_adamw'] == 1.0
  summary = (tmp_path / 'summary.md').read_text()
  assert '| muon_beta0.6 | 0.01 |' in summary
  for png in ('val_accuracy_vs_epoch', 'val_accuracy_vs_time', 'layer_metrics'):
    assert (tmp_path / f'{png}.png').exists()
  assert 'stem/kernel' in (tmp_path / 'routing.txt').read_text()
  # --diagnostics: per-layer metrics of the applied updates.
  layers = results['runs'][-1]['history'][-1]['layers']
  assert layers and all(
    0.0 < m['orthogonality_error'] < 1.0 and m['update_to_weight_rms'] > 0.0
    for m in layers.values()
  )


@pytest.mark.slow
def test_transformer_end_to_end(tmp_path):
  # The test split is reported; a row may set config fields (here QK-Clip's
  # threshold); --first-seed runs later seeds; recorded max logits get a
  # table and a plot. The tiny config and learning rate are those of
  # transformer/train_test.py's QK-Clip check, where muon's logits grow.
  cli.main(
    [
      '--task=transformer',
      '--steps=12',
      '--seeds=1',
      '--first-seed=2',
      '--optimizers=muon,adamw',
      '--variant',
      'muon_qkclip=muon:config.qk_clip=1.0',
      '--lr-grid',
      'muon=0.3',
      'adamw=0.01',
      'muon_qkclip=0.3',
      '--set',
      'record_max_logits=True',
      'd_model=16',
      'num_heads=2',
      'context=16',
      'batch_size=4',
      'eval_every=3',
      'eval_windows=8',
      'max_bytes=20000',
      '--out',
      str(tmp_path),
      '--no-progress',
    ]
  )
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['rows']['muon_qkclip'] == {
    'optimizer': 'muon',
    'kwargs': {'config.qk_clip': 1.0},
  }
  assert [(r['name'], r['seed']) for r in results['runs']] == [
    ('muon', 2),
    ('adamw', 2),
    ('muon_qkclip', 2),
  ]
  for run in results['runs']:
    assert set(run['final']) == {'test_loss', 'val_loss'}
    assert [h['step'] for h in run['history']] == [3, 6, 9, 12]
  assert results['analysis']['final_key'] == 'test_loss'
  assert results['runs'][2]['optimizer_kwargs'] == {}
  free, _, clipped = (
    [h['max_logit'] for h in r['history']] for r in results['runs']
  )
  assert max(clipped[1:]) < max(free[1:])  # the clip reached its row only
  summary = (tmp_path / 'summary.md').read_text()
  assert 'chosen on seed 2' in summary
  assert 'In the search (seed 2), first point → peak' in summary
  assert '| muon_qkclip | 0.3 |' in summary.split('Largest attention')[1]
  for png in ('val_loss_vs_step', 'val_loss_vs_time', 'max_logit_vs_step'):
    assert (tmp_path / f'{png}.png').exists()


@pytest.mark.parametrize(
  'argv, match',
  [
    (['--mesh', '2,4'], '--mesh is for --task transformer'),
    (['--task', 'transformer', '--mesh', '8'], '--mesh takes DATA,FSDP'),
    (['--task', 'transformer', '--mesh', 'a,b'], '--mesh takes DATA,FSDP'),
    (['--task', 'transformer', '--set', 'mesh=2,4'], 'Use --mesh'),
    (['--set', 'learning_rate=0.1'], 'the harness sets'),
    (['--set', 'widths=a'], "Could not override field 'widths'"),
    (['--task', 'resnet', '--steps', '5'], '--steps is for transformer and'),
    (['--variant', 'fast=adam:beta=0.9'], '--variant takes'),
    (['--optimizers', 'adam'], "Unknown optimizer 'adam'"),
    (['--optimizers', ''], 'No rows to train'),  # '' is not the default
    (['--lr-grid', 'adam=0.1'], '--lr-grid takes'),
    (['--lr-grid', 'muon=0.1,x'], '--lr-grid takes'),
    (['--variant', 'x=muon:config.seed=3'], 'a row may set config.FIELD'),
    (['--variant', 'x=muon:config.nope=3'], 'got config.nope'),
    (['--seeds', '1', '--first-seed', '-1'], '--first-seed at least 0'),
    (['--use-lr', 'muon=0.01'], '--use-lr is for --merge'),
  ],
)
def test_bad_arguments(argv, match, tmp_path):
  with pytest.raises(SystemExit, match=match):
    cli.main([*argv, '--out', str(tmp_path)])


def _run(name, seed, lr, steps, vals, optimizer=None, step_time=0.1):
  """A run whose validation loss is `vals` at steps 10, 20, ..."""
  return {
    'name': name,
    'optimizer': optimizer or name,
    'seed': seed,
    'learning_rate': lr,
    'total_steps': steps,
    'step_time': step_time,
    'final': {'test_loss': vals[-1] + 0.1, 'val_loss': vals[-1]},
    'history': [
      {'step': 10 * (i + 1), 'epoch': 0.1 * (i + 1), 'val_loss': v}
      for i, v in enumerate(vals)
    ],
  }


def _summary(runs):
  """`report.summarize` of a 40-step Transformer comparison of `runs`."""
  return report.summarize(
    {
      'task': 'transformer',
      'data': 'x',
      'num_params': 1,
      'budget': '40 steps',
      'runs': runs,
      'tuning': {r['name']: [(r['learning_rate'], 0.0)] for r in runs},
      'chosen_lr': {r['name']: r['learning_rate'] for r in runs},
      'command': 'c',
    }
  )


def test_analysis_steps_to_reach_and_step_time_ratio():
  runs = [
    _run('muon', 0, 0.02, 40, [3.0, 2.5, 2.0, 1.8], step_time=0.15),
    _run('muon', 1, 0.02, 40, [3.0, 2.3, 2.2, 1.8], step_time=0.13),
    _run('adamw', 0, 0.01, 40, [3.0, 2.8, 2.5, 2.3]),
    _run('adamw', 1, 0.01, 40, [3.0, 2.8, 2.5, 2.3]),
    _run('sgd', 0, 0.1, 40, [3.0, 2.9, 2.8, 1.0]),
  ]
  a = analysis.analyze({'task': 'transformer', 'runs': runs})
  table = a['table']
  assert table['muon']['test_loss'] == pytest.approx([1.9, 0.0])
  assert table['muon']['step_time_vs_adamw'] == pytest.approx(1.4)
  # Muon's seed mean is 3.0, 2.4, 2.1, 1.8: AdamW's final 2.3 at step 30.
  assert a['reach']['muon']['adamw'] == {
    'target': 2.3,
    'step': 30,
    'fraction': 0.75,
  }
  assert a['reach']['muon']['sgd']['step'] is None  # 1.0 is never reached
  assert 'nadamw' not in a['reach']['muon']
  assert 'muon' not in a['reach']['muon']
  # A partial merge (sgd has one seed so far): the rows say how many, and
  # one seed shows no spread.
  summary = _summary(runs)
  assert '1–2 seeds (column `seeds`) per optimizer' in summary
  assert '| muon | 0.02 | 2 | 1.9000 ± 0.0000 | 1.8000 ± 0.0000 |' in summary
  assert '| sgd | 0.1 | 1 | 1.1000 | 1.0000 |' in summary
  assert '- sgd: 0.1: 0.0000 → **0.1** (one rate: set, not searched)' in summary


def test_analysis_normuon_reaches_muon():
  runs = [
    _run('muon', 0, 0.02, 40, [3.0, 2.5, 2.0, 1.8]),
    _run('normuon', 0, 0.02, 40, [3.0, 2.2, 1.8, 1.7]),
    _run('adamw', 0, 0.01, 40, [3.0, 2.8, 2.5, 2.3]),
    _run('sgd', 0, 0.1, 40, [3.0, 2.9, 2.8, 2.7]),
  ]
  a = analysis.analyze({'task': 'transformer', 'runs': runs})
  assert a['reach']['normuon']['muon'] == {
    'target': 1.8,
    'step': 30,
    'fraction': 0.75,
  }
  assert a['reach']['normuon']['adamw']['step'] == 20
  assert set(a['reach']) == {'muon', 'normuon'}  # not sgd's or adamw's
  summary = _summary(runs)
  assert '| muon | 30 (0.75×; 2.3000) | 20 (0.50×; 2.7000) | — |' in summary
  assert (
    '| normuon | 20 (0.50×; 2.3000) | 20 (0.50×; 2.7000) | 30 (0.75×; 1.8000) |'
    in summary
  )


def test_merge_picks_the_best_seed0_lr_of_each_search(tmp_path):
  full_grid = tmp_path / 'a'  # muon searched at the full budget (100 steps)
  short_grid = tmp_path / 'b'  # adamw searched on 40 steps, then seeds
  lines = {
    full_grid: [
      _run('muon', 0, 0.01, 100, [2.5]),
      _run('muon', 0, 0.02, 100, [2.1]),
      _run('muon', 0, 0.04, 100, [math.nan]),
      _run('muon', 1, 0.02, 100, [2.2]),
    ],
    short_grid: [
      _run('adamw', 0, 0.01, 40, [2.9]),
      _run('adamw', 0, 0.003, 40, [3.1]),
      _run('adamw', 0, 0.01, 100, [2.6]),
      _run('adamw', 1, 0.01, 100, [2.7]),
    ],
  }
  for d, runs in lines.items():
    d.mkdir()
    (d / 'runs.partial.jsonl').write_text(
      '\n'.join(json.dumps(r) for r in runs) + '\n'
    )
  args = argparse.Namespace(
    merge=[str(full_grid), str(short_grid)],
    task='transformer',
    data=None,
    optimizers=None,
    use_lr=[],
  )
  results = merge.merge(args)
  assert results['chosen_lr'] == {'muon': 0.02, 'adamw': 0.01}
  assert results['search_best_lr'] == {}
  picked = [(r['name'], r['seed'], r['learning_rate']) for r in results['runs']]
  assert picked == [
    ('muon', 0, 0.02),
    ('muon', 1, 0.02),
    ('adamw', 0, 0.01),
    ('adamw', 1, 0.01),
  ]
  assert dict(results['tuning']['adamw']) == {0.01: 2.9, 0.003: 3.1}
  assert results['tune_budget'] == 0.4
  assert results['search_budget'] == {'muon': 1.0, 'adamw': 0.4}
  grids = report.summarize(results).split('## Learning-rate grids')[1]
  # muon's seed-0 runs are at the full budget, adamw's at the search budget.
  muon = '- muon: 0.01: 2.5000, 0.02: 2.1000, 0.04: inf → **0.02**'
  assert f'{muon} (after 1× the budget)\n' in grids
  assert '- adamw: 0.003: 3.1000, 0.01: 2.9000 → **0.01** (at the edge' in grids
  # --optimizers keeps some rows: a partial merge while other rows still run.
  args.optimizers = 'adamw'
  assert [r['name'] for r in merge.merge(args)['runs']] == ['adamw'] * 2
  args.optimizers = 'adamw,muon'
  names = [r['name'] for r in merge.merge(args)['runs']]
  assert names == ['adamw', 'adamw', 'muon', 'muon']
  args.optimizers = 'adamw,sgd'
  with pytest.raises(SystemExit, match=r"no runs of \['sgd'\]"):
    merge.merge(args)
  # --use-lr: a row's results at another rate than its search's best (one
  # that diverged at the full budget), and the summary says so.
  args.optimizers, args.use_lr = None, ['muon=0.03']
  with pytest.raises(SystemExit, match='--use-lr sets muon to lr 0.03, but no'):
    merge.merge(args)
  args.use_lr = ['muon=0.01']
  (full_grid / 'runs.partial.jsonl').write_text(
    '\n'.join(
      json.dumps(r)
      for r in lines[full_grid] + [_run('muon', 1, 0.01, 100, [2.4])]
    )
  )
  results = merge.merge(args)
  assert results['chosen_lr'] == {'muon': 0.01, 'adamw': 0.01}
  assert results['search_best_lr'] == {'muon': 0.02}
  picked = [
    (r['name'], r['seed']) for r in results['runs'] if r['name'] == 'muon'
  ]
  assert picked == [('muon', 0), ('muon', 1)]
  assert all(r['learning_rate'] == 0.01 for r in results['runs'])
  grids = report.summarize(results).split('## Learning-rate grids')[1]
  assert '→ **0.01** (after 1× the budget; the search chose 0.02;' in grids
  for bad in (['muon=0.01,0.02'], ['sgd=0.1'], ['muon'], ['muon=x']):
    args.use_lr = bad
    with pytest.raises(SystemExit, match='--use-lr takes NAME=LR'):
      merge.merge(args)
