"""AOL preconditioning (Turbo-Muon) against Frobenius: polar error and time.

Turbo-Muon (arXiv 2512.04632) claims that its AOL scaling lets one of five
Newton–Schulz steps be dropped at equal quality. This measures, for every
preset, the relative Frobenius distance to the exact polar factor (float64
SVD) of `orthogonalize` with 3 to 5 steps under both preconditionings, on
Gaussian and ill-conditioned matrices, and times 4-step AOL against 5-step
Frobenius side by side (compiled first, interleaved medians).

  python benchmarks/precondition.py [--quick]

Writes benchmarks/results/precondition.{json,md}.
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import timing  # noqa: E402
import muon_optax  # noqa: E402

PRESETS = ('polar_express', 'jordan', 'dion')
STEPS = (3, 4, 5)


def _matrix(kind: str, m: int, n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if kind == 'gaussian':
    return rng.standard_normal((m, n)).astype(np.float32)
  cond = float(kind.split('_')[1])
  u, _ = np.linalg.qr(rng.standard_normal((m, m)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  k = min(m, n)
  s = np.geomspace(1.0, 1.0 / cond, k)
  return ((u[:, :k] * s) @ v[:, :k].T).astype(np.float32)


def _polar(x: np.ndarray) -> np.ndarray:
  u, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
  return u @ vt


def errors(shape, kinds, seeds):
  rows = []
  for kind in kinds:
    inputs = [_matrix(kind, *shape, seed) for seed in seeds]
    polars = [_polar(x) for x in inputs]
    for preset in PRESETS:
      for pre in ('frobenius', 'aol'):
        for steps in STEPS:
          errs = []
          for x, p in zip(inputs, polars, strict=True):
            o = muon_optax.orthogonalize(
              x, preset, steps, preconditioning=pre, compute_dtype=jnp.float32
            )
            d = np.asarray(o, np.float64) - p
            errs.append(float(np.linalg.norm(d) / np.linalg.norm(p)))
          rows.append(
            {
              'matrix': kind,
              'preset': preset,
              'preconditioning': pre,
              'steps': steps,
              'polar_error': float(np.mean(errs)),
            }
          )
  return rows


def times(shapes, runs):
  out = []
  for shape in shapes:
    x = jnp.asarray(_matrix('gaussian', *shape, 0))
    fns = {}
    for name, pre, steps in (
      ('frobenius-5', 'frobenius', 5),
      ('aol-4', 'aol', 4),
      ('aol-5', 'aol', 5),
    ):
      f = jax.jit(
        lambda x, pre=pre, steps=steps: muon_optax.orthogonalize(
          x, 'polar_express', steps, preconditioning=pre
        )
      )
      compiled = f.lower(x).compile()
      fns[name] = lambda c=compiled, x=x: c(x)
    t = timing.interleaved(fns, runs=runs)
    base = t['frobenius-5'].median
    out.append(
      {
        'shape': list(shape),
        **{k: v.as_dict() for k, v in t.items()},
        'aol4_over_frobenius5': t['aol-4'].median / base,
        'aol5_over_frobenius5': t['aol-5'].median / base,
      }
    )
  return out


def _markdown(result) -> str:
  lines = [
    '# AOL vs Frobenius preconditioning',
    '',
    f'{result["shape"][0]}x{result["shape"][1]} float32, relative Frobenius '
    f'distance to the SVD polar factor, mean of {result["seeds"]} seeds.',
    '',
    '| matrix | preset | frobenius 3/4/5 steps | aol 3/4/5 steps | '
    'aol-4 ÷ frobenius-5 |',
    '|---|---|---|---|---|',
  ]
  rows = result['errors']
  for kind in result['kinds']:
    for preset in PRESETS:
      get = lambda pre, s, kind=kind, preset=preset: next(
        r['polar_error']
        for r in rows
        if (r['matrix'], r['preset'], r['preconditioning'], r['steps'])
        == (kind, preset, pre, s)
      )
      fro = ' / '.join(f'{get("frobenius", s):.3f}' for s in STEPS)
      aol = ' / '.join(f'{get("aol", s):.3f}' for s in STEPS)
      ratio = get('aol', 4) / get('frobenius', 5)
      lines.append(f'| {kind} | {preset} | {fro} | {aol} | {ratio:.2f} |')
  lines += [
    '',
    'Time of `orthogonalize` (polar_express), jitted, interleaved medians:',
    '',
    '| shape | frobenius-5 | aol-4 | aol-5 | aol-4 ÷ frobenius-5 |',
    '|---|---|---|---|---|',
  ]
  for t in result['times']:
    ms = lambda k, t=t: f'{1e3 * t[k]["median_s"]:.2f} ms'
    lines.append(
      f'| {t["shape"][0]}x{t["shape"][1]} | {ms("frobenius-5")} | '
      f'{ms("aol-4")} | {ms("aol-5")} | {t["aol4_over_frobenius5"]:.2f} |'
    )
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument(
    '--out', default=str(pathlib.Path(__file__).parent / 'results')
  )
  args = parser.parse_args()
  shape = (128, 384) if args.quick else (512, 2048)
  seeds = (0,) if args.quick else (0, 1, 2)
  kinds = ('gaussian', 'cond_1e2', 'cond_1e4')
  result = {
    'backend': jax.default_backend(),
    'shape': list(shape),
    'seeds': len(seeds),
    'kinds': kinds,
    'errors': errors(shape, kinds, seeds),
    'times': times(
      [(256, 256), (256, 1024)] if args.quick else [(1024, 1024), (768, 3072)],
      runs=3 if args.quick else 7,
    ),
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = 'precondition_quick' if args.quick else 'precondition'
  (out / f'{stem}.json').write_text(json.dumps(result, indent=1))
  (out / f'{stem}.md').write_text(_markdown(result))
  print(_markdown(result))


if __name__ == '__main__':
  main()
