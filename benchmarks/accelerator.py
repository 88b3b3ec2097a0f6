"""Muon on an accelerator: Newton–Schulz throughput, full update, bf16 error.

  python benchmarks/accelerator.py            # GPU/TPU sizes, < 5 min on one
  python benchmarks/accelerator.py --quick    # small sizes, runs on CPU

Sections:
  peaks           one big square matmul in bfloat16 and in float32 (HIGHEST
                  precision, what the float32 Newton–Schulz runs): the
                  same-process peaks the other figures are divided by;
  newton_schulz   `muon_optax.orthogonalize` (Polar Express, 5 steps) on
                  1024², 4096² and 4096×16384, with bfloat16 and float32
                  matmul operands: TFLOP/s and fraction of both peaks;
  update          the full jitted update of a 12-layer d768 GPT-like tree
                  and a ResNet-18-like tree (benchmarks/trees.py): every
                  `group_strategy` of muon_optax against optax.contrib.muon
                  with the same routing, matrix views, coefficients (jordan,
                  5 steps) and shape scaling (0.2·√max(fan_in, fan_out)),
                  and optax.adamw;
  polar_error     relative Frobenius error of `orthogonalize` against the
                  float64 SVD polar factor U·Vᵀ, Gaussian and ill-conditioned
                  matrices, bfloat16 and float32 operands.

FLOPs per Newton–Schulz step of an m×n matrix, m ≤ n: 4·m²·n + 2·m³ (the
plain iteration; muon_optax's Gram form for rectangular matrices runs fewer,
reported as `executed`). Every timing compiles first, warms up, blocks on the
outputs and takes the median of interleaved runs (benchmarks/timing.py).
Results: benchmarks/results/accelerator.{json,md} (accelerator_quick.* with
--quick), or `--out DIR`.
"""

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import pathlib
import sys
import time
from typing import Any

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import trees  # noqa: E402
from benchmarks.flops import matmul_flops  # noqa: E402
from benchmarks.timing import compile_seconds  # noqa: E402
from benchmarks.timing import interleaved  # noqa: E402
import muon_optax  # noqa: E402

NS_STEPS = 5
STRATEGIES = ('stack', 'unroll', 'map')
DTYPES = ('bfloat16', 'float32')
# Singular values of the ill-conditioned matrices: geometric from 1 down to
# 1 / CONDITION.
CONDITION = 1e4


@dataclasses.dataclass(frozen=True)
class Sizes:
  peak_side: int
  ns_shapes: tuple[tuple[int, int], ...]
  gpt: dict[str, Any]
  resnet: dict[str, Any]
  polar_shape: tuple[int, int]
  runs: int


FULL = Sizes(
  peak_side=8192,
  ns_shapes=((1024, 1024), (4096, 4096), (4096, 16384)),
  gpt={'num_layers': 12, 'd': 768},
  resnet={'widths': (64, 128, 256, 512)},  # ResNet-18's own widths
  polar_shape=(512, 2048),
  runs=7,
)
QUICK = Sizes(
  peak_side=512,
  ns_shapes=((64, 64), (128, 128), (128, 512)),
  gpt={'num_layers': 1, 'd': 64, 'vocab': 256, 'seq_len': 64},
  # Two stages of one block: every kind of kernel (stem, 3x3, 1x1 shortcut)
  # at a fraction of the compile time.
  resnet={'widths': (8, 16), 'blocks': (1, 1)},
  polar_shape=(64, 256),
  runs=3,
)


def ns_flops(m: int, n: int, steps: int = NS_STEPS) -> int:
  """FLOPs of `steps` plain Newton–Schulz steps on an m×n matrix."""
  short, long = min(m, n), max(m, n)
  return steps * (4 * short * short * long + 2 * short**3)


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
  # NumPy: jax.random eagerly compiles one kernel per shape.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _timing(t) -> dict[str, Any]:
  return t.as_dict()


# peaks -----------------------------------------------------------------------


def _matmul(dtype: str, side: int):
  """A compiled square matmul of `dtype` operands and its FLOPs."""
  precision = (
    jax.lax.Precision.HIGHEST
    if dtype == 'float32'
    else jax.lax.Precision.DEFAULT
  )
  a = _normal(1, (side, side), jnp.dtype(dtype))
  b = _normal(2, (side, side), jnp.dtype(dtype))
  f = jax.jit(functools.partial(jnp.matmul, precision=precision))
  compiled, _ = compile_seconds(f, a, b)
  return functools.partial(compiled, a, b), 2 * side**3


def peaks_section(sizes: Sizes) -> dict[str, Any]:
  thunks, flops = {}, {}
  for dt in DTYPES:
    thunks[dt], flops[dt] = _matmul(dt, sizes.peak_side)
  t = interleaved(thunks, runs=sizes.runs)
  out = {}
  for dt in DTYPES:
    out[dt] = {
      'matrix': f'{sizes.peak_side}x{sizes.peak_side}',
      'tflops': flops[dt] / t[dt].median / 1e12,
      **_timing(t[dt]),
    }
  print(
    '  peaks: '
    + ' | '.join(f'{dt} {v["tflops"]:.2f} TF/s' for dt, v in out.items()),
    flush=True,
  )
  return out


# newton_schulz ---------------------------------------------------------------


def _orthogonalize(x, compute_dtype):
  return muon_optax.orthogonalize(
    x,
    ns_coeffs='polar_express',
    ns_steps=NS_STEPS,
    compute_dtype=compute_dtype,
  )


def ns_section(sizes: Sizes, peaks: dict[str, Any]) -> list[dict[str, Any]]:
  rows = []
  for m, n in sizes.ns_shapes:
    x = _normal(3, (m, n))
    flops = ns_flops(m, n)
    thunks, compile_s, executed = {}, {}, {}
    for dt in DTYPES:
      f = jax.jit(
        functools.partial(_orthogonalize, compute_dtype=jnp.dtype(dt))
      )
      compiled, compile_s[dt] = compile_seconds(f, x)
      thunks[dt] = functools.partial(compiled, x)
      executed[dt] = matmul_flops(f, x)
    t = interleaved(thunks, runs=sizes.runs)
    row = {'matrix': f'{m}x{n}', 'flops': flops, 'variants': {}}
    for dt in DTYPES:
      tflops = flops / t[dt].median / 1e12
      row['variants'][dt] = {
        'tflops': tflops,
        'frac_bf16_peak': tflops / peaks['bfloat16']['tflops'],
        'frac_f32_peak': tflops / peaks['float32']['tflops'],
        # The same, counting the FLOPs muon_optax actually runs.
        'executed_flops': executed[dt],
        'executed_frac_own_peak': executed[dt]
        / t[dt].median
        / 1e12
        / peaks[dt]['tflops'],
        'compile_s': compile_s[dt],
        **_timing(t[dt]),
      }
    row['bf16_speedup'] = t['float32'].median / t['bfloat16'].median
    rows.append(row)
    v = row['variants']
    print(
      f'  NS {m}x{n}: bf16 {v["bfloat16"]["tflops"]:.3f} TF/s '
      f'({v["bfloat16"]["frac_bf16_peak"]:.2f} of bf16 peak), f32 '
      f'{v["float32"]["tflops"]:.3f} TF/s '
      f'({v["float32"]["frac_f32_peak"]:.2f} of f32 peak)',
      flush=True,
    )
  return rows


# update ----------------------------------------------------------------------


def build_tree(fn, **kwargs) -> trees.Tree:
  """`fn(**kwargs)` (a benchmarks/trees.py tree) with Gaussian parameters.

  Only the shapes, labels and views are taken from `fn`, by tracing it: its
  eager initializers compile one random kernel per shape, which took longer
  on this CPU than the rest of --quick. Timings do not depend on the
  values.
  """
  box = {}

  def params():
    box['tree'] = fn(**kwargs)
    return box['tree'].params

  values = _gaussian_like(jax.eval_shape(params), seed=0, scale=0.02)
  return dataclasses.replace(box['tree'], params=values)


def _tree_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _gaussian_like(tree: Any, seed: int, scale: float = 1.0) -> Any:
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), tree
  )


def _max_rel_diff(a: Any, b: Any) -> float:
  diffs = [
    float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return max(diffs)


def update_section(tree: trees.Tree, runs: int) -> dict[str, Any]:
  """Every group strategy against optax.contrib.muon, same routing."""
  params = tree.params
  grads = _gaussian_like(params, seed=1)
  lr = 1e-3
  txs = {
    f'muon_optax[{s}]': muon_optax.muon(
      learning_rate=lr,
      ns_coeffs='jordan',
      param_labels=tree.labels,
      matrix_views=tree.dims,
      group_strategy=s,
    )
    for s in STRATEGIES
  }
  # optax's scale_by_shape with consistent_rms=0.2 is muon_optax's default
  # shape scaling, 0.2·√max(fan_in, fan_out); both use jordan's 5 steps.
  txs['optax.contrib.muon'] = optax.contrib.muon(
    lr, muon_weight_dimension_numbers=tree.dims, consistent_rms=0.2
  )
  txs['optax.adamw'] = optax.adamw(lr)
  thunks, compile_s, state_bytes, outputs = {}, {}, {}, {}
  for name, tx in txs.items():
    state = jax.jit(tx.init)(params)  # one compile, not one per eager op
    state_bytes[name] = _tree_bytes(state)
    compiled, compile_s[name] = compile_seconds(
      jax.jit(tx.update), grads, state, params
    )
    thunks[name] = functools.partial(compiled, grads, state, params)
    outputs[name] = thunks[name]()[0]
  t = interleaved(thunks, runs=runs)
  ours = [f'muon_optax[{s}]' for s in STRATEGIES]
  best = min(ours, key=lambda k: t[k].median)
  out = {
    'tree': tree.describe(),
    'ns_gflop': sum(ns_flops(m, n) for _, m, n in tree.muon_matrices()) / 1e9,
    'param_bytes': _tree_bytes(params),
    'fastest_strategy': best,
    # The strategies only schedule the same arithmetic: their updates agree
    # to float rounding (0 is possible, hence no positivity here).
    'strategies_max_rel_diff': max(
      _max_rel_diff(outputs[k], outputs[ours[0]]) for k in ours[1:]
    ),
    'variants': {},
  }
  for name in txs:
    out['variants'][name] = {
      **_timing(t[name]),
      'compile_s': compile_s[name],
      'state_bytes': state_bytes[name],
      'speedup_vs_optax_muon': t['optax.contrib.muon'].median / t[name].median,
      'time_vs_adamw': t[name].median / t['optax.adamw'].median,
    }
  print(
    f'  update {tree.name}: '
    + ' | '.join(f'{k} {t[k].median * 1e3:.2f} ms' for k in txs),
    flush=True,
  )
  return out


# polar_error -----------------------------------------------------------------


def _test_matrices(m: int, n: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  gaussian = rng.standard_normal((m, n))
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  s = np.geomspace(1.0, 1.0 / CONDITION, k)
  return {'gaussian': gaussian, 'ill_conditioned': (u * s) @ v.T}


def _svd_polar(x: np.ndarray) -> np.ndarray:
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vt


def polar_section(sizes: Sizes) -> list[dict[str, Any]]:
  m, n = sizes.polar_shape
  rows = []
  for kind, x in _test_matrices(m, n).items():
    ref = _svd_polar(x)
    sv = np.linalg.svd(x, compute_uv=False)
    row = {
      'matrix': kind,
      'shape': f'{m}x{n}',
      'condition_number': float(sv[0] / sv[-1]),
      'ns_coeffs': 'polar_express',
      'ns_steps': NS_STEPS,
      'rel_error_vs_svd_polar': {},
    }
    xj = jnp.asarray(x, jnp.float32)
    for dt in DTYPES:
      o = jax.jit(
        functools.partial(_orthogonalize, compute_dtype=jnp.dtype(dt))
      )(xj)
      o = np.asarray(o, np.float64)
      row['rel_error_vs_svd_polar'][dt] = float(
        np.linalg.norm(o - ref) / np.linalg.norm(ref)
      )
    rows.append(row)
    e = row['rel_error_vs_svd_polar']
    print(
      f'  polar error {kind} {m}x{n}: bf16 {e["bfloat16"]:.4f}, '
      f'f32 {e["float32"]:.4f}',
      flush=True,
    )
  return rows


# output ----------------------------------------------------------------------


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def meta(quick: bool) -> dict[str, Any]:
  device = jax.devices()[0]
  return {
    'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'
    ),
    'backend': jax.default_backend(),
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'jax': jax.__version__,
    'jaxlib': _version('jaxlib'),
    'optax': optax.__version__,
    'muon_optax': getattr(muon_optax, '__version__', 'unknown'),
    'quick': quick,
  }


def _ms(v: dict[str, Any]) -> str:
  return (
    f'{v["median_s"] * 1e3:.3f} ({v["min_s"] * 1e3:.3f}–{v["max_s"] * 1e3:.3f})'
  )


def markdown(r: dict[str, Any]) -> str:
  m = r['meta']
  lines = [
    '# muon_optax on an accelerator',
    '',
    f'{m["date_utc"]}; backend `{m["backend"]}`, device '
    f'`{m["device_kind"]}` (×{m["device_count"]}); jax {m["jax"]}, jaxlib '
    f'{m["jaxlib"]}, optax {m["optax"]}, muon_optax {m["muon_optax"]}'
    + ('; **--quick** (small sizes)' if m['quick'] else '')
    + f'; whole run {r["wall_s"]:.0f} s.',
    '',
    'Times: median (min–max) in ms of interleaved runs after warm-up, '
    'compile excluded; ratios are between medians of this run.',
    '',
    '## Matmul peaks',
    '',
    '| dtype | matrix | TFLOP/s | ms |',
    '|---|---|---|---|',
  ]
  for dt, v in r['peaks'].items():
    lines.append(f'| {dt} | {v["matrix"]} | {v["tflops"]:.3f} | {_ms(v)} |')
  lines += [
    '',
    '## Newton–Schulz (Polar Express, 5 steps)',
    '',
    'TFLOP/s count the plain iteration, 5·(4m²n + 2m³) for m ≤ n; '
    '"executed ÷ own peak" divides the FLOPs muon_optax runs by the peak '
    'of its operand dtype.',
    '',
    '| matrix | operands | TFLOP/s | ÷ bf16 peak | ÷ f32 peak | '
    'executed ÷ own peak | ms | bf16 speed-up |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for row in r['newton_schulz']:
    for dt, v in row['variants'].items():
      lines.append(
        f'| {row["matrix"]} | {dt} | {v["tflops"]:.3f} | '
        f'{v["frac_bf16_peak"]:.2f} | {v["frac_f32_peak"]:.2f} | '
        f'{v["executed_frac_own_peak"]:.2f} | {_ms(v)} | '
        + (f'{row["bf16_speedup"]:.2f}× |' if dt == 'bfloat16' else ' |')
      )
  lines += [
    '',
    '## Full jitted update',
    '',
    'Same routing, matrix views, coefficients (jordan, 5 steps) and shape '
    'scaling (0.2·√max) for muon_optax and optax.contrib.muon; their '
    'Adam parts differ (optax.contrib.muon runs NAdam).',
  ]
  for u in r['update'].values():
    d = u['tree']
    lines += [
      '',
      f'### {d["name"]}: {d["params"]:,} params, {d["muon_matrices"]} Muon '
      f'matrices, {u["ns_gflop"]:.3g} GFLOP of Newton–Schulz',
      '',
      f'Fastest strategy: `{u["fastest_strategy"]}`; strategies agree to '
      f'{u["strategies_max_rel_diff"]:.1e} (max relative difference).',
      '',
      '| variant | ms | optax.contrib.muon ÷ this | this ÷ adamw | compile s |',
      '|---|---|---|---|---|',
    ]
    for name, v in u['variants'].items():
      lines.append(
        f'| {name} | {_ms(v)} | {v["speedup_vs_optax_muon"]:.2f}× | '
        f'{v["time_vs_adamw"]:.2f}× | {v["compile_s"]:.1f} |'
      )
  lines += [
    '',
    '## Error against the SVD polar factor',
    '',
    'Relative Frobenius error ‖NS(X) − U·Vᵀ‖ / ‖U·Vᵀ‖, U·Vᵀ from a float64 '
    'NumPy SVD; Polar Express, 5 steps, float32 input.',
    '',
    '| matrix | shape | condition | bf16 | f32 | bf16 ÷ f32 |',
    '|---|---|---|---|---|---|',
  ]
  for row in r['polar_error']:
    e = row['rel_error_vs_svd_polar']
    lines.append(
      f'| {row["matrix"]} | {row["shape"]} | {row["condition_number"]:.3g} '
      f'| {e["bfloat16"]:.4f} | {e["float32"]:.4f} | '
      f'{e["bfloat16"] / e["float32"]:.2f} |'
    )
  return '\n'.join(lines) + '\n'


def run(quick: bool) -> dict[str, Any]:
  sizes = QUICK if quick else FULL
  t0 = time.perf_counter()
  result: dict[str, Any] = {'meta': meta(quick)}
  print(
    f'backend {result["meta"]["backend"]}, {result["meta"]["device_kind"]}',
    flush=True,
  )
  section_s = {}

  def timed(name, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    section_s[name] = time.perf_counter() - t
    return out

  result['peaks'] = timed('peaks', peaks_section, sizes)
  result['newton_schulz'] = timed(
    'newton_schulz', ns_section, sizes, result['peaks']
  )
  result['update'] = {}
  for tree in (
    build_tree(trees.gpt, **sizes.gpt),
    build_tree(trees.resnet, **sizes.resnet),
  ):
    result['update'][tree.name] = timed(
      f'update {tree.name}', update_section, tree, sizes.runs
    )
  result['polar_error'] = timed('polar_error', polar_section, sizes)
  result['section_s'] = section_s
  result['wall_s'] = time.perf_counter() - t0
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--quick', action='store_true', help='small sizes, few runs (CPU)'
  )
  parser.add_argument(
    '--out',
    type=pathlib.Path,
    default=_HERE / 'results',
    help='folder for accelerator[_quick].{json,md}',
  )
  args = parser.parse_args(argv)
  result = run(args.quick)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = 'accelerator_quick' if args.quick else 'accelerator'
  (args.out / f'{stem}.json').write_text(json.dumps(result, indent=1) + '\n')
  (args.out / f'{stem}.md').write_text(markdown(result))
  print(f'wrote {args.out / stem}.{{json,md}} in {result["wall_s"]:.0f} s')
  return result


if __name__ == '__main__':
  main()
