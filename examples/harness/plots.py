"""The comparison's plots: the validation metric against steps (or epochs)
and wall-clock with seed bands, the held-out loss by noise level, sample
grids side by side, attention logits, per-layer metrics."""

import pathlib
from typing import Any

import numpy as np

from harness import analysis
from harness import tasks


def plot(results: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
  """The validation metric against epochs (or steps) and training
  wall-clock; bands span the seeds (min to max)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  task = tasks.TASKS[results['task']]
  unit = 'epoch' if task.budget == 'epochs' else 'step'
  rows = analysis.by_row(results)
  paths = []
  for xkey, xlabel, suffix in (
    (unit, unit, unit),
    ('wall_time', 'training wall-clock (s)', 'time'),
  ):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, runs in rows.items():
      y = analysis.mean_curve(runs, task.metric)
      x = analysis.mean_curve(runs, xkey).mean(0)
      (line,) = ax.plot(x, y.mean(0), label=name)
      if len(runs) > 1:
        ax.fill_between(
          x, y.min(0), y.max(0), alpha=0.2, color=line.get_color()
        )
    if not task.higher_is_better:  # keep a diverged run in frame
      best = min(
        analysis.mean_curve(r, task.metric).mean(0)[-1] for r in rows.values()
      )
      ax.set_ylim(0.9 * best, 2 * best)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(task.metric)
    ax.set_title(f'{results["task"]}: {task.metric} (band: min–max over seeds)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f'{task.metric}_vs_{suffix}.png'
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  logits = plot_max_logits(results, out)
  layers = plot_layer_metrics(results, out)
  by_t = plot_loss_by_t(results, out)
  samples = plot_samples(results, out)
  return paths + [p for p in (logits, layers, by_t, samples) if p]


def plot_loss_by_t(
  results: dict[str, Any], out: pathlib.Path
) -> pathlib.Path | None:
  """Each row's test loss at each fixed noise level (diffusion), as a
  ratio to AdamW's (or the first row's) at that level."""
  rows = {
    n: analysis.loss_by_t(runs) for n, runs in analysis.by_row(results).items()
  }
  rows = {n: v for n, v in rows.items() if v}
  if not rows:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ref = 'adamw' if 'adamw' in rows else next(iter(rows))
  ts = sorted(rows[ref])
  base = np.array([rows[ref][t].mean() for t in ts])
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name, by_t in rows.items():
    ax.plot(ts, [by_t[t].mean() for t in ts] / base, marker='o', label=name)
  ax.set_xlabel('timestep t (noise level)')
  ax.set_ylabel(f"test loss ÷ {ref}'s at that t")
  ax.set_title(f'{results["task"]}: held-out loss by noise level (seed mean)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = out / 'test_loss_by_t.png'
  fig.savefig(path)
  plt.close(fig)
  return path


def _samples_png(run: dict[str, Any], out: pathlib.Path):
  if 'samples' not in run or 'workdir' not in run:
    return None
  for base in (pathlib.Path(run['workdir']), out / run['workdir']):
    if (base / run['samples']).is_file():
      return base / run['samples']
  return None


def plot_samples(
  results: dict[str, Any], out: pathlib.Path
) -> pathlib.Path | None:
  """The sample grids of each row's first seed, side by side (all drawn
  from the same noise)."""
  grids = {}
  for name, runs in analysis.by_row(results).items():
    png = _samples_png(min(runs, key=lambda r: r['seed']), out)
    if png is not None:
      grids[name] = (png, min(r['seed'] for r in runs))
  if not grids:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.image as mpimg  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(
    1, len(grids), figsize=(3.2 * len(grids), 3.6), dpi=100, squeeze=False
  )
  for ax, (name, (png, seed)) in zip(axes[0], grids.items(), strict=True):
    ax.imshow(mpimg.imread(png))
    ax.set_title(f'{name} (seed {seed})', fontsize=9)
    ax.axis('off')
  fig.suptitle(f'{results["task"]}: samples from the same noise')
  fig.tight_layout()
  path = out / 'samples.png'
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_max_logits(
  results: dict[str, Any], out: pathlib.Path
) -> pathlib.Path | None:
  """The largest attention logit against steps, for the rows that
  recorded it (transformer with `record_max_logits` or `qk_clip`)."""
  rows = {
    name: runs
    for name, runs in analysis.by_row(results).items()
    if analysis.recorded_max_logits(runs)
  }
  if not rows:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name, runs in rows.items():
    y = analysis.mean_curve(runs, 'max_logit')
    x = analysis.mean_curve(runs, 'step').mean(0)
    (line,) = ax.plot(x, y.mean(0), label=name)
    if len(runs) > 1:
      ax.fill_between(x, y.min(0), y.max(0), alpha=0.2, color=line.get_color())
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_ylabel('largest attention logit since the previous point')
  ax.set_title(f'{results["task"]}: max attention logit (band: min–max)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = out / 'max_logit_vs_step.png'
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_layer_metrics(
  results: dict[str, Any], out: pathlib.Path
) -> pathlib.Path | None:
  """Per-layer update RMS ÷ weight RMS and orthogonality error of the first
  muon run recorded with --diagnostics, against step."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  run = next(
    (
      r for r in results['runs'] if r['history'] and 'layers' in r['history'][0]
    ),
    None,
  )
  if run is None:
    return None
  steps = [h['step'] for h in run['history']]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
  for ax, key, title in (
    (axes[0], 'update_to_weight_rms', 'update RMS ÷ weight RMS'),
    (axes[1], 'orthogonality_error', '‖OOᵀ − I‖_F / √k of the NS output'),
  ):
    for path in run['history'][0]['layers']:
      ys = [h['layers'][path][key] for h in run['history']]
      ax.plot(steps, ys, label=path.removesuffix('/kernel'))
    ax.set_xlabel('step')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_yscale('log')
  axes[1].legend(fontsize=6, ncol=2)
  fig.suptitle(
    f'{results["task"]}: {run["name"]} per layer (lr '
    f'{run["learning_rate"]:g}, seed {run["seed"]})'
  )
  fig.tight_layout()
  path = out / 'layer_metrics.png'
  fig.savefig(path)
  plt.close(fig)
  return path
