"""The figures of a comparison: per row the final metric over seeds, step
times and their ratio to AdamW's, and where each Muon row's curve reaches
each baseline's final value."""

from typing import Any

import numpy as np

from harness import tasks


def mean_curve(runs: list[dict[str, Any]], key: str) -> np.ndarray:
  n = min(len(r['history']) for r in runs)
  return np.array([[r['history'][i][key] for i in range(n)] for r in runs])


def to_reach(
  runs: list[dict[str, Any]], metric: str, higher: bool, target: float
) -> dict[str, float] | None:
  """The first evaluation where the seed-mean `metric` reaches `target`."""
  curve = mean_curve(runs, metric).mean(0)
  for i, v in enumerate(curve):
    if (v >= target) if higher else (v <= target):
      h = runs[0]['history'][i]
      return {'step': h['step'], 'epoch': h['epoch']}
  return None


def by_row(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
  rows: dict[str, list[dict[str, Any]]] = {}
  for r in results['runs']:
    rows.setdefault(r['name'], []).append(r)
  return rows


def final_metric_key(runs: list[dict[str, Any]], task: tasks.Task) -> str:
  if all(task.final_metric in r['final'] for r in runs):
    return task.final_metric
  return task.metric  # image data with test_size=0: no test split


def analyze(results: dict[str, Any]) -> dict[str, Any]:
  """The summary's figures: per row the final metric (mean, std), step time
  and its ratio to AdamW's; for each muon row, where its seed-mean
  validation curve first reaches each baseline's final mean."""
  task = tasks.TASKS[results['task']]
  rows = by_row(results)
  final_key = final_metric_key(results['runs'], task)
  unit = 'epoch' if task.budget == 'epochs' else 'step'
  adamw_ms = None
  if 'adamw' in rows:
    adamw_ms = float(np.mean([r['step_time'] for r in rows['adamw']]))
  table = {}
  for name, runs in rows.items():
    finals = np.array([r['final'][final_key] for r in runs])
    vals = np.array([r['history'][-1][task.metric] for r in runs])
    ms = float(np.mean([r['step_time'] for r in runs]))
    table[name] = {
      'optimizer': runs[0]['optimizer'],
      'learning_rate': runs[0]['learning_rate'],
      'seeds': len(runs),
      final_key: [float(finals.mean()), float(finals.std())],
      task.metric: [float(vals.mean()), float(vals.std())],
      'step_time': ms,
      'step_time_vs_adamw': ms / adamw_ms if adamw_ms else None,
    }
  reach = {}
  for name, runs in rows.items():
    if runs[0]['optimizer'] not in tasks.OURS:
      continue
    reach[name] = {}
    for base in (*tasks.BASELINES, 'muon'):
      if base not in rows or base == name:
        continue
      target = table[base][task.metric][0]
      hit = to_reach(runs, task.metric, task.higher_is_better, target)
      budget = rows[base][0]['history'][-1][unit]
      reach[name][base] = {
        'target': target,
        unit: None if hit is None else hit[unit],
        'fraction': None if hit is None else hit[unit] / budget,
      }
  return {'final_key': final_key, 'unit': unit, 'table': table, 'reach': reach}


def recorded_max_logits(runs: list[dict[str, Any]]) -> bool:
  return bool(runs) and all(
    'max_logit' in h for r in runs for h in r['history']
  )


def search_max_logits(
  searched: dict[str, list[dict[str, Any]]],
) -> dict[str, list[list[float]]]:
  """Per row, `[lr, first, peak]` of the search runs' recorded max
  logits: how fast each learning rate grows them."""
  out = {}
  for name, runs in searched.items():
    if recorded_max_logits(runs):
      out[name] = [
        [
          r['learning_rate'],
          r['history'][0]['max_logit'],
          max(h['max_logit'] for h in r['history']),
        ]
        for r in runs
      ]
  return out


def loss_by_t(runs: list[dict[str, Any]]) -> dict[int, np.ndarray] | None:
  """{timestep: the runs' test losses there}, if every run recorded them."""
  if not runs or not all('test_loss_by_t' in r['final'] for r in runs):
    return None
  levels = runs[0]['final']['test_loss_by_t']
  return {
    int(t): np.array([r['final']['test_loss_by_t'][t] for r in runs])
    for t in levels
  }
