"""The markdown summary of a comparison, and the files it writes:
`summary.md`, `results.json` and the plots; `step_times.{md,json}`."""

import json
import pathlib
from typing import Any

from harness import analysis
from harness import plots
from harness import tasks


def _mean_std(mean_std: tuple[float, float], seeds: int) -> str:
  """`mean ± std`; the mean alone for one seed, which has no spread."""
  mean, std = mean_std
  return f'{mean:.4f}' if seeds == 1 else f'{mean:.4f} ± {std:.4f}'


def summarize(results: dict[str, Any]) -> str:
  """The markdown summary of a `results.json` dict."""
  task = tasks.TASKS[results['task']]
  a = analysis.analyze(results)
  final_key, unit, table = a['final_key'], a['unit'], a['table']
  counts = sorted({row['seeds'] for row in table.values()})
  uneven = len(counts) > 1  # a partial merge: the rows say how many
  if uneven:
    seeds = f'{counts[0]}–{counts[-1]} seeds (column `seeds`)'
  else:
    seeds = f'{counts[0]} seed(s)'
  lines = [
    f'# {results["task"]} on {results["data"]}',
    '',
    f'Model: {results["num_params"]:,} parameters. Budget: '
    f'{results["budget"]}. {seeds} per optimizer; each learning '
    f'rate chosen on seed {results.get("search_seed", 0)} by the final '
    f'validation `{task.metric}` after '
    f'{results.get("tune_budget", 1.0):g}× the budget; `{final_key}` is '
    'measured once, at the end. Step times are per run, one run after '
    'another (training steps only); under shared load, `--step-times` '
    'interleaves the optimizers for a fairer ratio.',
    '',
  ]
  cols = [
    'optimizer',
    'lr',
    *(['seeds'] if uneven else []),
    f'{final_key} (mean ± std)',
    f'final {task.metric} (mean ± std)',
    'ms / step',
    "× AdamW's ms / step",
  ]
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, row in table.items():
    ratio = row['step_time_vs_adamw']
    cells = [
      name,
      f'{row["learning_rate"]:g}',
      *([str(row['seeds'])] if uneven else []),
      _mean_std(row[final_key], row['seeds']),
      _mean_std(row[task.metric], row['seeds']),
      f'{1e3 * row["step_time"]:.0f}',
      '—' if ratio is None else f'{ratio:.2f}',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if any(a['reach'].values()):
    bases = [
      b
      for b in (*tasks.BASELINES, 'muon')
      if any(b in hits for hits in a['reach'].values())
    ]
    lines += [
      '',
      f"{unit.capitalize()}s for each Muon row's seed-mean validation "
      f"`{task.metric}` to first reach each baseline's final mean (× that "
      f"baseline's {unit}s):",
      '',
      '| | ' + ' | '.join(f"{b}'s final" for b in bases) + ' |',
      '|' + '---|' * (len(bases) + 1),
    ]
    for name, hits in a['reach'].items():
      if not hits:
        continue
      cells = [name]
      for b in bases:
        h = hits.get(b)
        if h is None:
          cells.append('—')
        elif h[unit] is None:
          cells.append(f'not reached ({h["target"]:.4f})')
        else:
          n = f'{h[unit]:.2f}' if unit == 'epoch' else f'{h[unit]}'
          cells.append(f'{n} ({h["fraction"]:.2f}×; {h["target"]:.4f})')
      lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [
    '',
    f'## Learning-rate grids (seed {results.get("search_seed", 0)}, final '
    'validation metric of the search)',
    '',
  ]
  tune_budget = results.get('tune_budget', 1.0)
  for name, grid in results['tuning'].items():
    grid = sorted(grid)
    cells = ', '.join(f'{lr:g}: {v:.4f}' for lr, v in grid)
    chosen = results['chosen_lr'][name]
    notes = []
    # A merged row whose seed-0 runs are at another budget than the others'.
    fraction = results.get('search_budget', {}).get(name, tune_budget)
    if fraction != tune_budget:
      notes.append(f'after {fraction:g}× the budget')
    overridden = results.get('search_best_lr', {}).get(name)
    if overridden is not None:
      notes.append(f'the search chose {overridden:g}; results at {chosen:g}')
    if len(grid) == 1:
      notes.append('one rate: set, not searched')
    elif chosen in (grid[0][0], grid[-1][0]):
      notes.append('at the edge of the grid: widen it')
    note = f' ({"; ".join(notes)})' if notes else ''
    lines.append(f'- {name}: {cells} → **{chosen:g}**{note}')
  lines += _max_logit_lines(results)
  lines += _by_t_lines(results)
  lines += [
    '',
    f'![{task.metric} vs {unit}]({task.metric}_vs_{unit}.png)',
    f'![{task.metric} vs wall-clock]({task.metric}_vs_time.png)',
    '',
    f'Command: `{results["command"]}`',
    '',
  ]
  return '\n'.join(lines)


def _by_t_lines(results: dict[str, Any]) -> list[str]:
  """The test loss of each row at each fixed noise level (diffusion)."""
  rows = {
    n: analysis.loss_by_t(runs) for n, runs in analysis.by_row(results).items()
  }
  rows = {n: v for n, v in rows.items() if v}
  if not rows:
    return []
  ts = sorted(next(iter(rows.values())))
  lines = [
    '',
    '## Test loss by noise level (mean ± std over seeds)',
    '',
    '| row | ' + ' | '.join(f't={t}' for t in ts) + ' |',
    '|' + '---|' * (len(ts) + 1),
  ]
  for name, by_t in rows.items():
    cells = [f'{by_t[t].mean():.4f} ± {by_t[t].std():.4f}' for t in ts]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines += ['', '![test loss by noise level](test_loss_by_t.png)']
  if 'samples.png' in results.get('plots', ()):
    lines += ['', '![samples](samples.png)']
  return lines


def _max_logit_lines(results: dict[str, Any]) -> list[str]:
  """A table of the largest attention logits of the rows that recorded
  them: at the first point, the peak over the run, and at the end."""
  lines = []
  for name, runs in analysis.by_row(results).items():
    if not analysis.recorded_max_logits(runs):
      continue
    curves = analysis.mean_curve(runs, 'max_logit')
    cells = [
      name,
      f'{runs[0]["learning_rate"]:g}',
      *(
        f'{v.mean():.1f} ± {v.std():.1f}'
        for v in (curves[:, 0], curves.max(1), curves[:, -1])
      ),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if not lines:
    return []
  lines = [
    '',
    '## Largest attention logit (mean ± std over seeds)',
    '',
    'Each point is the largest logit of any head over the steps since the '
    'previous point.',
    '',
    '| row | lr | first point | peak | last point |',
    '|---|---|---|---|---|',
    *lines,
  ]
  searched = results.get('search_max_logits') or {}
  if searched:
    lines += [
      '',
      f'In the search (seed {results.get("search_seed", 0)}), first point → '
      'peak:',
      '',
    ]
    for name, grid in searched.items():
      cells = ', '.join(
        f'{lr:g}: {first:.1f} → {peak:.1f}' for lr, first, peak in sorted(grid)
      )
      lines.append(f'- {name}: {cells}')
  return [*lines, '', '![max logit vs step](max_logit_vs_step.png)']


def write(results: dict[str, Any], out: pathlib.Path) -> None:
  results['analysis'] = analysis.analyze(results)
  results['plots'] = [p.name for p in plots.plot(results, out)]
  (out / 'results.json').write_text(json.dumps(results, indent=1))
  summary = summarize(results)
  (out / 'summary.md').write_text(summary)
  print(summary)
  print(f'Wrote {out}/summary.md, results.json and plots.')


def write_step_times(result: dict[str, Any], out: pathlib.Path) -> None:
  (out / 'step_times.json').write_text(json.dumps(result, indent=1))
  lines = [
    f'# {result["task"]}: train step times',
    '',
    f'{result["num_params"]:,} parameters, batch {result["batch_size"]}; '
    f"{result['rounds']} rounds, each optimizer's step once per round "
    '(compiled and warmed up first).',
    '',
    "| optimizer | median ms | min ms | × AdamW's median |",
    '|---|---|---|---|',
  ]
  for name, ms in result['median_ms'].items():
    ratio = result['vs_adamw'].get(name)
    lines.append(
      f'| {name} | {ms:.1f} | {result["min_ms"][name]:.1f} | '
      + ('—' if ratio is None else f'{ratio:.3f}')
      + ' |'
    )
  lines += ['', f'Command: `{result["command"]}`', '']
  (out / 'step_times.md').write_text('\n'.join(lines))
  print('\n'.join(lines))
