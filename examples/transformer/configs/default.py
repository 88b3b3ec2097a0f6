"""Default hyperparameters: the byte-level Transformer (1.4M parameters).

A frozen dataclass stands in for `ml_collections.ConfigDict`, which this
project does not depend on: `get_config().replace(steps=4000)` in code,
`--config.steps=4000` on the command line (`Config.override`).
"""

import ast
import dataclasses
import types
import typing
from typing import Any


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one run needs.

  Attributes:
    data: a text file (e.g. tinyshakespeare's `input.txt`); None: Python's
      standard-library sources (no download), capped at `max_bytes`.
    max_bytes: size cap of the embedded corpus.
    d_model: model width.
    num_layers: Transformer blocks.
    num_heads: attention heads.
    context: tokens per training window.
    optimizer: `muon`, `adamw`, `nadamw`, `sgd` or `optax_muon`.
    optimizer_kwargs: more keyword arguments of the optimizer, e.g.
      `{'beta': 0.9}` for `muon`.
    head_names: `muon` and `normuon` only: fnmatch patterns naming the
      output head, which goes to the Adam part (`muon_optax.param_labels`'s
      `head_names`); None: the library's; empty (`--config.head_names=`):
      the head goes to Muon.
    learning_rate: peak learning rate.
    warmup_fraction: linear warm-up over this fraction of the steps, then
      linear decay to 0.
    batch_size: windows per step.
    steps: training steps.
    seed: initialization and batching seed.
    eval_every: steps between validation points.
    eval_windows: validation (and test) windows: non-overlapping, from the
      start of each split.
    eval_batch_size: windows per evaluation batch.
    qk_clip: QK-Clip's threshold τ (`muon_optax.qk_clip`, after any
      optimizer): heads whose largest attention logit of a step exceeds it
      get their query and key kernels rescaled. None: off.
    record_max_logits: record the largest attention logit of every step
      (in the history as `max_logit`; on with `qk_clip`).
    mesh: `(data, fsdp)` device mesh shape, e.g. `(2, 4)`: batches split
      over all devices, every parameter and optimizer-state leaf sharded on
      its largest axis divisible by `fsdp`. None: one device.
  """

  data: str | None = None
  max_bytes: int = 2_000_000
  d_model: int = 192
  num_layers: int = 3
  num_heads: int = 6
  context: int = 64
  optimizer: str = 'muon'
  optimizer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  head_names: tuple[str, ...] | None = None
  learning_rate: float = 0.02
  warmup_fraction: float = 0.1
  batch_size: int = 32
  steps: int = 2000
  seed: int = 0
  eval_every: int = 100
  eval_windows: int = 512
  eval_batch_size: int = 128
  qk_clip: float | None = None
  record_max_logits: bool = False
  mesh: tuple[int, int] | None = None

  def replace(self, **changes: Any) -> 'Config':
    return dataclasses.replace(self, **changes)

  def override(self, assignments: typing.Sequence[str]) -> 'Config':
    """A copy with `FIELD=VALUE` strings applied, parsed by field type."""
    hints = typing.get_type_hints(type(self))
    changes = {}
    for item in assignments:
      name, sep, text = item.partition('=')
      if not sep or name not in hints:
        raise ValueError(
          f'Expected FIELD=VALUE with FIELD one of {sorted(hints)}, got '
          f'{item!r}.'
        )
      changes[name] = _parse(name, hints[name], text)
    return dataclasses.replace(self, **changes)


def _parse(name: str, annotation: Any, text: str) -> Any:
  """`text` as a value of type `annotation` (bool, int, float, str, None,
  tuples, dicts)."""
  options = [annotation]
  if isinstance(annotation, types.UnionType):
    options = list(typing.get_args(annotation))
  if type(None) in options and text.lower() == 'none':
    return None
  kind = next(a for a in options if a is not type(None))
  origin = typing.get_origin(kind) or kind
  try:
    if origin is bool:
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(text)
      return text.lower() in ('true', '1')
    if origin is tuple:
      item = (typing.get_args(kind) or (int,))[0]  # tuple[str, ...]: str
      return tuple(item(v) for v in text.split(',') if v)
    if origin is dict:
      value = ast.literal_eval(text)
      if not isinstance(value, dict):
        raise ValueError(text)
      return value
    return origin(text)
  except (ValueError, SyntaxError):
    raise ValueError(
      f'`{name}` takes a {getattr(kind, "__name__", kind)}, got {text!r}.'
    ) from None


def get_config() -> Config:
  """3 blocks of width 192, 6 heads, context 64: 1.44M parameters; 2,000
  steps of 32 windows (about 4 passes over tinyshakespeare's training
  split)."""
  return Config()
