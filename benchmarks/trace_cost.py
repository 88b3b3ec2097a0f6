"""Cost of `trace_routing` against one compile of the Muon update it routes.

    python benchmarks/trace_cost.py [--runs 7]

Two models, both given as shapes only (`jax.ShapeDtypeStruct`s; nothing is
initialised or run): a 12-layer d384 GPT-like Flax Linen model (unrolled
blocks, fused qkv, untied head, vocabulary 50304, 256 tokens) and a CIFAR
ResNet-18 (width 64, BatchNorm). For each, `trace_routing` is timed (median
of `--runs` calls after one warm-up), split into its `jax.make_jaxpr` part
and the analysis of the jaxpr, and set against one
`jax.jit(tx.update).lower(...).compile()` of `muon_optax.muon` with the
traced routing, on the same params, in the same run.

Writes benchmarks/results/trace_cost.{json,md}.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import muon_optax  # noqa: E402
from muon_optax import trace_routing  # noqa: E402
from muon_optax._paths import leaves_with_paths  # noqa: E402


class GPTBlock(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm(name='ln_1')(x)
    q, k, v = jnp.split(nn.Dense(3 * d, name='c_attn')(h), 3, axis=-1)
    q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(d // self.heads)
    att = jax.nn.softmax(jnp.where(mask, att, -jnp.inf), axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, t, d)
    x = x + nn.Dense(d, name='attn_proj')(y)
    h = nn.LayerNorm(name='ln_2')(x)
    h = nn.Dense(d, name='mlp_proj')(nn.gelu(nn.Dense(4 * d, name='c_fc')(h)))
    return x + h


class GPT(nn.Module):
  vocab: int = 50304
  d: int = 384
  layers: int = 12
  heads: int = 6
  block_size: int = 256

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d, name='wte')(tokens)
    x = x + nn.Embed(self.block_size, self.d, name='wpe')(
      jnp.arange(tokens.shape[1])
    )
    for i in range(self.layers):
      x = GPTBlock(self.d, self.heads, name=f'h_{i}')(x)
    return nn.Dense(self.vocab, use_bias=False, name='lm_head')(
      nn.LayerNorm(name='ln_f')(x)
    )


class BasicBlock(nn.Module):
  ch: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    bn = lambda: nn.BatchNorm(use_running_average=True)  # noqa: E731
    y = nn.Conv(self.ch, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(bn()(y))
    y = bn()(nn.Conv(self.ch, (3, 3), use_bias=False)(y))
    if x.shape[-1] != self.ch or self.strides != 1:
      x = nn.Conv(self.ch, (1, 1), self.strides, use_bias=False)(x)
      x = bn()(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  width: int = 64
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    for stage in range(4):
      ch = self.width * 2**stage
      for i in range(2):
        x = BasicBlock(ch, 2 if stage and not i else 1)(x)
    return nn.Dense(self.classes)(x.mean((1, 2)))


def _models() -> dict[str, tuple[Any, Any, Any]]:
  """name -> (fn, params, input), all shapes only."""
  key = jax.random.key(0)
  gpt = GPT()
  tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
  gpt_params = jax.eval_shape(gpt.init, key, tokens)['params']
  resnet = ResNet18()
  images = jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(resnet.init, key, images)
  # Closed over like a real training loop's (concrete, small) statistics.
  stats = jax.tree.map(
    lambda s: jnp.zeros(s.shape, s.dtype), variables['batch_stats']
  )
  return {
    'gpt_12x384': (
      lambda p, t: gpt.apply({'params': p}, t),
      gpt_params,
      tokens,
    ),
    'resnet18_cifar': (
      lambda p, x: resnet.apply({'params': p, 'batch_stats': stats}, x),
      variables['params'],
      images,
    ),
  }


def _seconds(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _measure(fn, params, x, runs: int) -> dict[str, Any]:
  # The machine is shared: the two are timed in alternating rounds, and the
  # analysis is the median of the per-round differences.
  thunks = {
    'trace_routing': lambda: trace_routing(fn, params, x),
    # A fresh function each call: make_jaxpr caches traces by function.
    'make_jaxpr': lambda: jax.make_jaxpr(lambda p, x: fn(p, x))(params, x),
  }
  for thunk in thunks.values():
    thunk()  # warm-up
  samples = {name: [] for name in thunks}
  for _ in range(runs):
    for name, thunk in thunks.items():
      samples[name].append(_seconds(thunk))
  trace_s = statistics.median(samples['trace_routing'])
  jaxpr_s = statistics.median(samples['make_jaxpr'])
  analysis_s = statistics.median(
    [
      t - j
      for t, j in zip(
        samples['trace_routing'], samples['make_jaxpr'], strict=True
      )
    ]
  )
  routing = trace_routing(fn, params, x)
  table = routing.by_path()
  sizes = {path: leaf.size for path, leaf in leaves_with_paths(params)}
  muon = [p for p, (label, _, _) in table.items() if label == 'muon']
  tx = muon_optax.muon(learning_rate=1e-3, param_labels=routing)
  state = jax.eval_shape(tx.init, params)
  t0 = time.perf_counter()
  jax.jit(tx.update).lower(params, state, params).compile()
  compile_s = time.perf_counter() - t0
  return {
    'leaves': len(table),
    'params': sum(sizes.values()),
    'muon_leaves': len(muon),
    'muon_params': sum(sizes[p] for p in muon),
    'trace_routing_median_s': trace_s,
    'trace_routing_samples_s': samples['trace_routing'],
    'make_jaxpr_median_s': jaxpr_s,
    'make_jaxpr_samples_s': samples['make_jaxpr'],
    'analysis_median_s': analysis_s,
    'update_compile_s': compile_s,
    'trace_over_compile': trace_s / compile_s,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--runs', type=int, default=7)
  parser.add_argument(
    '--out', default=str(pathlib.Path(__file__).parent / 'results')
  )
  args = parser.parse_args()
  results = {
    name: _measure(fn, params, x, args.runs)
    for name, (fn, params, x) in _models().items()
  }
  record = {
    'device': str(jax.devices()[0]),
    'jax': jax.__version__,
    'runs': args.runs,
    'models': results,
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'trace_cost.json').write_text(json.dumps(record, indent=2))
  platform = jax.devices()[0].platform
  md = [
    f'# trace_routing cost ({platform}, jax {jax.__version__})',
    '',
    f'trace_routing: median of {args.runs} calls after one warm-up; its '
    'make_jaxpr part timed alone in alternating rounds; analysis: median '
    'of the per-round differences. '
    'Compile: one `jax.jit(tx.update).lower(...).compile()` of '
    '`muon_optax.muon` with the traced routing, in the same run.',
    '',
    '| model | params | Muon leaves (params) | trace_routing ms '
    '| make_jaxpr ms | analysis ms | update compile s | trace ÷ compile |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for name, r in results.items():
    md.append(
      f'| {name} | {r["params"]:,} | {r["muon_leaves"]} '
      f'({r["muon_params"]:,}) | {1e3 * r["trace_routing_median_s"]:.0f} '
      f'| {1e3 * r["make_jaxpr_median_s"]:.0f} '
      f'| {1e3 * r["analysis_median_s"]:.0f} '
      f'| {r["update_compile_s"]:.2f} | {r["trace_over_compile"]:.3f} |'
    )
  md.append('')
  (out / 'trace_cost.md').write_text('\n'.join(md))
  print('\n'.join(md))


if __name__ == '__main__':
  main()
