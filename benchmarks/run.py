"""Benchmarks of muon_optax against optax.contrib.muon and optax.adamw.

  python benchmarks/run.py            # full run, ~10 min on 2 CPU cores
  python benchmarks/run.py --quick    # smaller shapes and fewer runs, ~2 min

Sections (see benchmarks/README.md):
  (a) Newton–Schulz GFLOP/s and fraction of a same-process matmul peak;
      compute dtype (speed and error against the SVD polar factor);
  (b) full jitted update time on a GPT-like and a ResNet-like tree;
  (c) train step time, muon vs adamw, on a ConvNet and a Transformer;
  (d) optimizer state bytes;
  (e) compile time of the update.

Every comparison runs its variants interleaved (A, B, A, B, ...) and reports
the median and min–max of >= 5 timed runs after warm-up; compile time is
measured apart. Results go to benchmarks/results/ as JSON and markdown.
"""

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))

# pylint: disable=wrong-import-position
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import trees  # noqa: E402
from benchmarks.flops import matmul_flops  # noqa: E402
from benchmarks.timing import compile_seconds  # noqa: E402
from benchmarks.timing import interleaved  # noqa: E402
import muon_optax  # noqa: E402

JORDAN = jnp.array((3.4445, -4.7750, 2.0315))  # KellerJordan/Muon
NS_STEPS = 5


def ns_flops(m: int, n: int, steps: int = NS_STEPS) -> int:
  """FLOPs of `steps` quintic Newton–Schulz steps on an m x n matrix."""
  short, long = min(m, n), max(m, n)
  return steps * (4 * short * short * long + 2 * short**3)


def _key(i: int) -> jax.Array:
  return jax.random.key(i)


def _stats(t) -> dict[str, Any]:
  return t.as_dict()


# (a) Newton–Schulz throughput ----------------------------------------------


def _peak_fn(side: int):
  a = jax.random.normal(_key(1), (side, side), jnp.float32)
  b = jax.random.normal(_key(2), (side, side), jnp.float32)
  f = jax.jit(jnp.matmul).lower(a, b).compile()
  return (lambda: f(a, b)), 2 * side**3


def _optax_ns(x, dims):
  # optax.contrib.muon's own NS, the peer under comparison; optax does not
  # export it, and wrapping it in scale_by_muon would add the momentum.
  from optax.contrib import _muon  # pylint: disable=import-outside-toplevel

  return _muon.orthogonalize_via_newton_schulz(
    x, JORDAN, NS_STEPS, dimension_numbers=dims
  )


def ns_section(quick: bool, runs: int) -> list[dict[str, Any]]:
  shapes = [
    ('256x256', (256, 256)),
    ('512x512', (512, 512)),
    ('768x768', (768, 768)),
    ('768x3072', (768, 3072)),
    ('3072x768', (3072, 768)),
    ('1024x4096', (1024, 4096)),
    ('24x768x768', (24, 768, 768)),
    ('3x3x64x128', (3, 3, 64, 128)),
  ]
  if quick:
    shapes = [s for s in shapes if s[0] not in ('1024x4096',)]
    shapes = [
      ('8x768x768', (8, 768, 768)) if s[0] == '24x768x768' else s
      for s in shapes
    ]
  peak, peak_flops = _peak_fn(1024 if quick else 2048)
  rows = []
  for name, shape in shapes:
    x = jax.random.normal(_key(3), shape, jnp.float32)
    if len(shape) == 4:  # a conv kernel, Flax layout (kh, kw, in, out)
      view = muon_optax.MatrixView.conv(2).resolve(shape)
      dims = trees.CONV
    elif len(shape) == 3:
      view = muon_optax.MatrixView.dense().resolve(shape)
      dims = optax.contrib.MuonDimensionNumbers(1, 2)
    else:
      view = muon_optax.MatrixView.dense().resolve(shape)
      dims = trees.DENSE
    b, m, n = view.num_matrices, *view.matrix_shape
    flops = b * ns_flops(m, n)

    def ours(x, view=view, strategy=None):
      mats = view.to_matrices(x)
      if strategy is None:
        o = muon_optax.orthogonalize(mats, ns_coeffs='jordan')
      else:
        # beta=0 without Nesterov: the "momentum" is the input itself.
        tx = muon_optax.scale_by_muon(
          'jordan',
          NS_STEPS,
          0.0,
          nesterov=False,
          matrix_views=muon_optax.MatrixView.dense(),
          group_strategy=strategy,
        )
        o, _ = tx.update(mats, tx.init(mats))
      return view.from_matrices(o)

    variants = {'muon_optax': jax.jit(ours)}
    if b > 1:
      # `orthogonalize` on a batch runs the CPU default ('map' there): time
      # the three strategies and report the default's under its own name.
      variants = {
        f'muon_optax[{s}]': jax.jit(functools.partial(ours, strategy=s))
        for s in ('stack', 'unroll', 'map')
      }
    variants['optax'] = jax.jit(functools.partial(_optax_ns, dims=dims))
    thunks = {'peak_matmul': peak}
    compile_s = {}
    for vname, f in variants.items():
      compiled, compile_s[vname] = compile_seconds(f, x)
      thunks[vname] = functools.partial(compiled, x)
    t = interleaved(thunks, runs=runs)
    if b > 1:
      default = 'map' if jax.default_backend() == 'cpu' else 'stack'
      variants['muon_optax'] = variants[f'muon_optax[{default}]']
      compile_s['muon_optax'] = compile_s[f'muon_optax[{default}]']
      t['muon_optax'] = t[f'muon_optax[{default}]']
    executed = matmul_flops(variants['muon_optax'], x)
    peak_gflops = peak_flops / t['peak_matmul'].median / 1e9
    row = {
      'shape': name,
      'matrix': f'{b}x({m}x{n})' if b > 1 else f'{m}x{n}',
      'flops': flops,
      'peak_gflops': peak_gflops,
      'peak': _stats(t['peak_matmul']),
      # FLOPs muon_optax actually runs (fewer than `flops` in Gram form)
      'muon_optax_executed_flops': executed,
      'muon_optax_executed_frac_peak': executed
      / t['muon_optax'].median
      / 1e9
      / peak_gflops,
      'variants': {},
    }
    for vname in variants:
      gflops = flops / t[vname].median / 1e9
      row['variants'][vname] = {
        **_stats(t[vname]),
        'gflops': gflops,
        'frac_peak': gflops / peak_gflops,
        'compile_s': compile_s[vname],
      }
    rows.append(row)
    print(
      f'  NS {name:>12}: peak {peak_gflops:6.1f} GF/s | '
      + ' | '.join(
        f'{k} {v["frac_peak"]:.2f}' for k, v in row['variants'].items()
      ),
      flush=True,
    )
  return rows


def _polar(x: np.ndarray) -> np.ndarray:
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vt


def dtype_section(quick: bool, runs: int) -> list[dict[str, Any]]:
  """float32 vs bfloat16 matmul operands: speed and error vs U Vᵀ."""
  shapes = [(768, 768), (768, 3072)] if not quick else [(512, 512)]
  rows = []
  for m, n in shapes:
    x = jax.random.normal(_key(4), (m, n), jnp.float32)
    ref = _polar(np.asarray(x))
    fns, errs, compile_s = {}, {}, {}
    for dt in ('float32', 'bfloat16'):
      f = jax.jit(
        functools.partial(muon_optax.orthogonalize, compute_dtype=jnp.dtype(dt))
      )
      compiled, compile_s[dt] = compile_seconds(f, x)
      fns[dt] = functools.partial(compiled, x)
      o = np.asarray(compiled(x), np.float64)
      errs[dt] = float(np.linalg.norm(o - ref) / np.linalg.norm(ref))
    t = interleaved(fns, runs=runs)
    row = {'matrix': f'{m}x{n}', 'coeffs': 'polar_express', 'variants': {}}
    for dt in fns:
      row['variants'][dt] = {
        **_stats(t[dt]),
        'rel_error_vs_svd_polar': errs[dt],
        'compile_s': compile_s[dt],
      }
    row['bf16_speedup'] = t['float32'].median / t['bfloat16'].median
    rows.append(row)
    print(
      f'  dtype {m}x{n}: bf16 speed-up {row["bf16_speedup"]:.2f}, '
      f'error f32 {errs["float32"]:.3f} bf16 {errs["bfloat16"]:.3f}',
      flush=True,
    )
  return rows


# (b, d, e) full update -------------------------------------------------------


def _tree_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def update_section(
  tree: trees.Tree, runs: int, strategies: bool
) -> dict[str, Any]:
  params = tree.params
  grads = jax.tree.map(
    lambda p, k: jax.random.normal(k, p.shape, p.dtype),
    params,
    jax.tree.unflatten(
      jax.tree.structure(params),
      list(jax.random.split(_key(5), len(jax.tree.leaves(params)))),
    ),
  )
  mo = functools.partial(
    muon_optax.muon,
    1e-3,
    ns_coeffs='jordan',
    consistent_rms=None,
    param_labels=tree.labels,
    matrix_views=tree.dims,
  )
  txs = {
    'muon_optax': mo(),
    'optax.contrib.muon': optax.contrib.muon(
      1e-3, muon_weight_dimension_numbers=tree.dims
    ),
    'optax.adamw': optax.adamw(1e-3),
  }
  if strategies:  # 'auto' (muon_optax's default) is the row muon_optax
    for s in ('stack', 'unroll', 'map'):
      txs[f'muon_optax[{s}]'] = mo(group_strategy=s)
  thunks, compile_s, state_bytes = {}, {}, {}
  for name, tx in txs.items():
    state = tx.init(params)
    state_bytes[name] = _tree_bytes(state)
    compiled, compile_s[name] = compile_seconds(
      jax.jit(tx.update), grads, state, params
    )
    thunks[name] = functools.partial(compiled, grads, state, params)
  t = interleaved(thunks, runs=runs)
  out = {
    'tree': tree.describe(),
    'ns_gflop': sum(ns_flops(m, n) for _, m, n in tree.muon_matrices()) / 1e9,
    'param_bytes': _tree_bytes(params),
    'variants': {},
  }
  for name in txs:
    out['variants'][name] = {
      **_stats(t[name]),
      'compile_s': compile_s[name],
      'state_bytes': state_bytes[name],
      'state_vs_adamw': state_bytes[name] / state_bytes['optax.adamw'],
      'time_vs_adamw': t[name].median / t['optax.adamw'].median,
    }
  out['speedup_vs_optax_muon'] = (
    t['optax.contrib.muon'].median / t['muon_optax'].median
  )
  # (d) the state with bfloat16 momenta (an option, not the default): shapes
  # only, nothing to time.
  bf16_state = jax.eval_shape(mo(mu_dtype=jnp.bfloat16).init, params)
  out['state_vs_adamw_bf16_momentum'] = (
    _tree_bytes(bf16_state) / state_bytes['optax.adamw']
  )
  print(
    f'  update {tree.name}: '
    + ' | '.join(f'{k} {t[k].median * 1e3:.1f} ms' for k in txs)
    + f' | speed-up vs optax {out["speedup_vs_optax_muon"]:.2f}x',
    flush=True,
  )
  return out


# (c) train step ------------------------------------------------------------


def _load_models():
  """The examples' models, as the examples build them by default."""
  from examples.convnet import models as cm  # pylint: disable=import-outside-toplevel
  from examples.transformer import models as tm  # pylint: disable=import-outside-toplevel

  convnet = lambda: cm.ConvNet(10, rngs=nnx.Rngs(0))
  transformer = lambda: tm.Transformer(65, 64, rngs=nnx.Rngs(0))
  source = {
    'convnet': 'examples/convnet/models.py (ConvNet, defaults)',
    'transformer': (
      'examples/transformer/models.py (Transformer, defaults: 2 layers, '
      'd128, 4 heads; vocab 65, context 64)'
    ),
  }
  return convnet, transformer, source


def _train_step(model: nnx.Module, tx: optax.GradientTransformation):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  def step(params, rest, opt_state, x, y):
    model = nnx.merge(graphdef, params, rest)

    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  return jax.jit(step), (params, rest, opt_state)


def _muon_ns_flops(model: nnx.Module) -> float:
  """NS FLOPs of one update, on the matrix views muon_optax uses."""
  labels = jax.tree.leaves(muon_optax.route(model).labels)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  views = jax.tree.leaves(
    muon_optax.route(model).views,
    is_leaf=lambda v: v is None or isinstance(v, muon_optax.MatrixView),
  )
  total = 0
  for p, lab, view in zip(params, labels, views, strict=True):
    if lab == 'muon':
      view = view or muon_optax.MatrixView.conv(p.ndim - 2)
      r = view.resolve(p.shape)
      total += r.num_matrices * ns_flops(*r.matrix_shape)
  return float(total)


def _train_case(model_fn, x, y, runs: int) -> dict[str, Any]:
  model = model_fn()
  txs = {
    'muon_optax': muon_optax.muon(1e-3, param_labels=model),
    'optax.adamw': optax.adamw(1e-3),
  }
  thunks, compile_s, flops = {}, {}, {}
  for name, tx in txs.items():
    step, (params, rest, opt_state) = _train_step(model_fn(), tx)
    compiled, compile_s[name] = compile_seconds(
      step, params, rest, opt_state, x, y
    )
    flops[name] = matmul_flops(step, params, rest, opt_state, x, y)
    thunks[name] = functools.partial(compiled, params, rest, opt_state, x, y)
  t = interleaved(thunks, runs=runs)
  ns = _muon_ns_flops(model)
  # NS FLOPs over the forward-plus-backward FLOPs: every dot and conv of
  # the AdamW step (which has no other matmuls).
  predicted = ns / flops['optax.adamw']
  measured = t['muon_optax'].median / t['optax.adamw'].median
  out = {
    'batch': int(x.shape[0]),
    'positions_per_step': int(np.prod(x.shape[:-1])) if x.ndim == 4 else 0,
    'ns_gflop': ns / 1e9,
    'train_gflop': {k: v / 1e9 for k, v in flops.items()},
    'predicted_overhead': predicted,
    'measured_ratio': measured,
    'measured_overhead': measured - 1,
    'overhead_vs_prediction': (measured - 1) / predicted,
    'variants': {k: {**_stats(t[k]), 'compile_s': compile_s[k]} for k in txs},
  }
  return out


def train_section(quick: bool, runs: int) -> dict[str, Any]:
  convnet, transformer, source = _load_models()
  out: dict[str, Any] = {'source': source, 'cases': []}
  rng = np.random.default_rng(0)
  bs = 128
  x = jnp.asarray(rng.normal(size=(bs, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, bs), jnp.int32)
  cases = [('convnet', convnet, x, y)]
  for bs in (8, 32) if quick else (8, 32, 128):
    tokens = jnp.asarray(rng.integers(0, 65, (bs, 64)), jnp.int32)
    cases.append(('transformer', transformer, tokens, tokens))
  for model_name, fn, x, y in cases:
    r = _train_case(fn, x, y, runs)
    r['model'] = model_name
    if model_name == 'transformer':
      r['tokens_per_step'] = int(np.prod(x.shape))
      r['positions_per_step'] = r['tokens_per_step']
    else:
      r['positions_per_step'] = int(x.shape[0] * x.shape[1] * x.shape[2])
    out['cases'].append(r)
    print(
      f'  train {model_name} batch {r["batch"]}: muon/adamw '
      f'{r["measured_ratio"]:.3f} (predicted overhead '
      f'{r["predicted_overhead"]:.3f}, measured {r["measured_overhead"]:.3f})',
      flush=True,
    )
  return out


# Report --------------------------------------------------------------------


def _ms(v: dict[str, Any]) -> str:
  return (
    f'{v["median_s"] * 1e3:.2f} ({v["min_s"] * 1e3:.2f}–{v["max_s"] * 1e3:.2f})'
  )


def markdown(res: dict[str, Any]) -> str:
  env = res['env']
  lines = [
    f'# muon_optax benchmarks ({"quick" if res["quick"] else "full"} run)',
    '',
    f'{env["date"]}; device `{env["device"]}` ({env["cpu_count"]} cores, '
    f'{env["machine"]}); jax {env["jax"]}, jaxlib {env["jaxlib"]}, optax '
    f'{env["optax"]}, flax {env["flax"]}, muon_optax {env["muon_optax"]}.',
    f'Times: median (min–max) of {res["runs"]} interleaved runs after '
    'warm-up, compile excluded; ratios are between medians of the same run. '
    'Load average (1 min) at start '
    f'{env["load_average_1_5_15"][0]:.1f}, at end '
    f'{env.get("load_average_at_end", [float("nan")])[0]:.1f}: the machine '
    'is shared, absolute times drift with it.',
    '',
    '## (a) Newton–Schulz, 5 steps, f32: fraction of the same-process '
    'matmul peak',
    '',
    'GF/s count the FLOPs of the plain iteration, 5·(4k²l + 2k³) for a k×l '
    'matrix (k ≤ l), so that a faster algorithm shows as a higher rate; '
    '"executed" divides the FLOPs muon_optax actually runs (fewer in the '
    'Gram form used for rectangular matrices).',
    '',
    '| shape | matrix | peak GF/s | muon_optax GF/s | muon_optax ÷ peak | '
    'executed ÷ peak | optax GF/s | optax ÷ peak | muon_optax ms | '
    'optax ms | speed-up |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in res['ns']:
    a, o = r['variants']['muon_optax'], r['variants']['optax']
    lines.append(
      f'| {r["shape"]} | {r["matrix"]} | {r["peak_gflops"]:.0f} | '
      f'{a["gflops"]:.0f} | **{a["frac_peak"]:.2f}** | '
      f'{r["muon_optax_executed_frac_peak"]:.2f} | {o["gflops"]:.0f} | '
      f'{o["frac_peak"]:.2f} | {_ms(a)} | {_ms(o)} | '
      f'{o["median_s"] / a["median_s"]:.2f}× |'
    )
  batched = [r for r in res['ns'] if 'muon_optax[stack]' in r['variants']]
  if batched:
    lines += [
      '',
      'Same-shape batch, by group strategy (ms, fraction of peak):',
      '',
      '| batch | stack | unroll | map |',
      '|---|---|---|---|',
    ]
    for r in batched:
      cells = [
        f'{_ms(r["variants"][f"muon_optax[{s}]"])}, '
        f'{r["variants"][f"muon_optax[{s}]"]["frac_peak"]:.2f}'
        for s in ('stack', 'unroll', 'map')
      ]
      lines.append(f'| {r["matrix"]} | ' + ' | '.join(cells) + ' |')
  lines += [
    '',
    '### Compute dtype (polar_express, 5 steps)',
    '',
    '| matrix | f32 ms | bf16 ms | bf16 speed-up | error f32 | error bf16 |',
    '|---|---|---|---|---|---|',
  ]
  for r in res['dtype']:
    f, b = r['variants']['float32'], r['variants']['bfloat16']
    lines.append(
      f'| {r["matrix"]} | {_ms(f)} | {_ms(b)} | {r["bf16_speedup"]:.2f} | '
      f'{f["rel_error_vs_svd_polar"]:.4f} | '
      f'{b["rel_error_vs_svd_polar"]:.4f} |'
    )
  lines += [
    '',
    'Error: relative Frobenius distance to the SVD polar factor U Vᵀ.',
    '',
    '## (b, d, e) Full jitted update',
    '',
    'Same routing and coefficients for both Muons (jordan, 5 steps, '
    'jordan scaling; conv kernels as (kh·kw·in, out) matrices).',
    '',
    '| tree | optimizer | update ms | ÷ adamw | compile s | state MB | '
    'state ÷ adamw |',
    '|---|---|---|---|---|---|---|',
  ]
  for u in res['update']:
    d = u['tree']
    for name, v in u['variants'].items():
      lines.append(
        f'| {d["name"]} ({d["muon_matrices"]} Muon matrices) | {name} | '
        f'{_ms(v)} | {v["time_vs_adamw"]:.1f} | {v["compile_s"]:.2f} | '
        f'{v["state_bytes"] / 2**20:.1f} | {v["state_vs_adamw"]:.3f} |'
      )
  lines += ['', 'Speed-up of muon_optax over optax.contrib.muon:', '']
  for u in res['update']:
    lines.append(
      f'- {u["tree"]["name"]}: **{u["speedup_vs_optax_muon"]:.2f}×** '
      f'({u["ns_gflop"]:.1f} GFLOP of Newton–Schulz per update)'
    )
  if res['update']:  # not with --only skipping it
    lines += [
      '',
      'State with `mu_dtype=jnp.bfloat16` (Muon momentum and Adam first '
      'moment in bfloat16; not the default), ÷ adamw: '
      + ', '.join(
        f'{u["tree"]["name"]} {u["state_vs_adamw_bf16_momentum"]:.3f}'
        for u in res['update']
      )
      + '.',
    ]
  tr = res['train']
  lines += [
    '',
    '## (c) Train step (forward, backward, update): muon_optax ÷ adamw',
    '',
    'Models: '
    + '; '.join(f'{k}: {v}' for k, v in tr['source'].items())
    + '. Predicted overhead: NS FLOPs ÷ the forward-plus-backward FLOPs '
    '(every dot and conv in the jaxpr of the AdamW step).',
    '',
    '| model | batch | positions | muon ms | adamw ms | muon ÷ adamw | '
    'predicted overhead | measured overhead | measured ÷ predicted |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for c in tr['cases']:
    m, a = c['variants']['muon_optax'], c['variants']['optax.adamw']
    lines.append(
      f'| {c["model"]} | {c["batch"]} | {c["positions_per_step"]} | {_ms(m)}'
      f' | {_ms(a)} | **{c["measured_ratio"]:.3f}** | '
      f'{c["predicted_overhead"]:.3f} | {c["measured_overhead"]:.3f} | '
      f'{c["overhead_vs_prediction"]:.2f} |'
    )
  lines += ['', '## Targets', '']
  for t in res['targets']:
    lines.append(
      f'- {t["target"]}: {t["figure"]} — {"met" if t["met"] else "NOT met"}'
    )
  return '\n'.join(lines) + '\n'


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
  out = []
  big = [
    r
    for r in res['ns']
    if min(int(s) for s in r['matrix'].split('(')[-1].strip(')').split('x'))
    >= 512
    and '(' not in r['matrix']
  ]
  if big:
    worst = min(r['variants']['muon_optax']['frac_peak'] for r in big)
    out.append(
      {
        'target': 'NS >= 0.90 of matmul peak, sides >= 512',
        'figure': ', '.join(
          f'{r["shape"]} {r["variants"]["muon_optax"]["frac_peak"]:.2f}'
          for r in big
        ),
        'met': worst >= 0.90,
      }
    )
  for u in res['update']:
    if u['tree']['name'].startswith('gpt'):
      out.append(
        {
          'target': f'update on {u["tree"]["name"]} >= 3x faster than '
          'optax.contrib.muon',
          'figure': f'{u["speedup_vs_optax_muon"]:.2f}x',
          'met': u['speedup_vs_optax_muon'] >= 3,
        }
      )
    v = u['variants']['muon_optax']
    out.append(
      {
        'target': f'state <= 0.55x adamw ({u["tree"]["name"]})',
        'figure': f'{v["state_vs_adamw"]:.3f}',
        'met': v['state_vs_adamw'] <= 0.55,
      }
    )
  for c in res['train']['cases']:
    if c['model'] == 'convnet':
      out.append(
        {
          'target': f'ConvNet train step muon/adamw <= 1.05 (batch '
          f'{c["batch"]})',
          'figure': f'{c["measured_ratio"]:.3f}',
          'met': c['measured_ratio'] <= 1.05,
        }
      )
    else:
      out.append(
        {
          'target': f'Transformer overhead within 1.25x of prediction '
          f'(batch {c["batch"]})',
          'figure': f'measured {c["measured_overhead"]:.3f} vs predicted '
          f'{c["predicted_overhead"]:.3f}: '
          f'{c["overhead_vs_prediction"]:.2f}x',
          'met': c['overhead_vs_prediction'] <= 1.25,
        }
      )
  return out


def env_info() -> dict[str, Any]:
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel

  return {
    'date': datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC'
    ),
    'device': str(jax.devices()[0].device_kind),
    'backend': jax.default_backend(),
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'optax': optax.__version__,
    'flax': flax.__version__,
    'muon_optax': muon_optax.__version__,
    'load_average_1_5_15': list(os.getloadavg()),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--runs', type=int, default=None)
  parser.add_argument('--out', default=str(_HERE / 'results'))
  parser.add_argument(
    '--only', default='ns,dtype,update,train', help='comma-separated sections'
  )
  args = parser.parse_args(argv)
  runs = args.runs or (5 if args.quick else 7)
  only = set(args.only.split(','))
  t0 = time.perf_counter()
  res: dict[str, Any] = {
    'quick': args.quick,
    'runs': runs,
    'env': env_info(),
    'ns': [],
    'dtype': [],
    'update': [],
    'train': {'source': {}, 'cases': []},
  }
  print(f'muon_optax benchmarks on {res["env"]["device"]}', flush=True)
  if 'ns' in only:
    res['ns'] = ns_section(args.quick, runs)
  if 'dtype' in only:
    res['dtype'] = dtype_section(args.quick, runs)
  if 'update' in only:
    if args.quick:
      tree_list = [
        trees.gpt(num_layers=2, d=256),
        trees.resnet((16, 32, 64), (1, 1, 1)),
      ]
    else:
      tree_list = [trees.gpt(), trees.resnet()]
    for tree in tree_list:
      res['update'].append(
        update_section(tree, runs, strategies=not args.quick)
      )
  if 'train' in only:
    res['train'] = train_section(args.quick, runs)
  res['targets'] = targets(res)
  res['total_s'] = time.perf_counter() - t0
  res['env']['load_average_at_end'] = list(os.getloadavg())
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = 'results_quick' if args.quick else 'results'
  (out / f'{stem}.json').write_text(json.dumps(res, indent=1))
  (out / f'{stem}.md').write_text(markdown(res))
  print(markdown(res))
  print(f'total {res["total_s"]:.0f} s; wrote {out / stem}.{{json,md}}')


if __name__ == '__main__':
  main()
