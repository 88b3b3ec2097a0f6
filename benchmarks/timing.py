"""Interleaved timing: compared variants run in turn, A, B, A, B, ...

The machine is shared, so absolute times drift with other people's load.
Every variant gets one sample per round, rounds alternate the variants, and
ratios are taken between medians of the same run.
"""

from collections.abc import Callable
import dataclasses
import statistics
import time
from typing import Any

import jax


def _block(x: Any) -> Any:
  return jax.block_until_ready(x)


@dataclasses.dataclass
class Timing:
  """Seconds per call: every sample is the mean over `number` calls."""

  samples: list[float]
  number: int

  @property
  def median(self) -> float:
    return statistics.median(self.samples)

  @property
  def min(self) -> float:
    return min(self.samples)

  @property
  def max(self) -> float:
    return max(self.samples)

  def as_dict(self) -> dict[str, Any]:
    return {
      'median_s': self.median,
      'min_s': self.min,
      'max_s': self.max,
      'runs': len(self.samples),
      'calls_per_run': self.number,
      'samples_s': self.samples,
    }


def _once(fn: Callable[[], Any], number: int) -> float:
  t0 = time.perf_counter()
  out = None
  for _ in range(number):
    out = fn()
  _block(out)
  return (time.perf_counter() - t0) / number


def interleaved(
  fns: dict[str, Callable[[], Any]],
  *,
  runs: int = 7,
  warmup: int = 2,
  min_sample_s: float = 0.02,
) -> dict[str, Timing]:
  """Times already-compiled thunks in alternating rounds.

  Each thunk is warmed up (the last warm-up call calibrates), so that one
  sample lasts at least
  `min_sample_s` (many calls of a fast function, averaged, so that timer and
  dispatch jitter stay small); then `runs` rounds time every thunk once each.
  """
  number = {}
  for name, fn in fns.items():
    for _ in range(warmup - 1):
      _block(fn())
    once = _once(fn, 1)  # the last warm-up call, timed to calibrate
    number[name] = max(1, min(1000, int(min_sample_s / max(once, 1e-7))))
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for r in range(runs):
    # Alternate the order as well, so no variant always follows the same one.
    order = list(fns) if r % 2 == 0 else list(reversed(fns))
    for name in order:
      samples[name].append(_once(fns[name], number[name]))
  return {name: Timing(samples[name], number[name]) for name in fns}


def compile_seconds(jitted: Any, *args: Any) -> tuple[Any, float]:
  """Lowers and compiles `jitted` for `args`; returns (compiled, seconds)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0
