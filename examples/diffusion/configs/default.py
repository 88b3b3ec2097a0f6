"""Default hyperparameters: the DDPM U-Net on CIFAR-10 (set `data` to it).

A frozen dataclass stands in for `ml_collections.ConfigDict`:
`get_config().replace(steps=4000)` in code, `--config.steps=4000` on the
command line (`Config.override`).
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
    data: a folder with `train/<class>/*.jpg` (and `test/`), or
      `train.tar.gz`/`test.tar.gz`, or `cifar-10-batches-py/`; None: the
      digits bundled with scikit-learn (no download).
    cache_dir: where decoded images are cached as `.npy`; None:
      `$MUON_OPTAX_CACHE` or `~/.cache/muon_optax`.
    test_size: when the data has no test split, training images held out as
      one (before the validation split); None: a fifth, at most 10,000.
    val_size: training images held out for validation (the learning-rate
      choice); the test split is never used for it.
    train_size: a fixed subset of the remaining images to train on; None
      keeps them all.
    flip: random horizontal flips.
    widths: channels per U-Net level (resolution 32/patch, then halved).
    blocks: residual blocks per level, down and up.
    heads: attention heads at the lowest resolution.
    groups: GroupNorm groups (at most).
    patch: the stem's patch size (and the head's): the levels run at
      32/patch and below.
    timesteps: diffusion steps T of the cosine schedule.
    optimizer: `muon`, `adamw`, `nadamw`, `sgd`, `optax_muon` or `normuon`.
    optimizer_kwargs: more keyword arguments of the optimizer, e.g.
      `{'b2': 0.99}` for `adamw`.
    head_names: `muon` and `normuon` only: fnmatch patterns naming the
      output head, which goes to the Adam part (`muon_optax.param_labels`'s
      `head_names`); None: the library's; empty (`--config.head_names=`):
      the head goes to Muon.
    learning_rate: peak learning rate.
    warmup_fraction: linear warm-up over this fraction of the steps, then
      linear decay to 0.
    batch_size: training batch size.
    steps: training steps.
    seed: initialization, shuffling, noise and augmentation seed.
    eval_every: steps between validation points.
    eval_size: validation images scored at each point (the head of the
      validation split); the test split is scored whole, once, at the end.
    eval_levels: noise levels of the held-out loss: image i is noised at the
      midpoint of stratum i mod `eval_levels` of [0, T), with noise drawn
      from a key that depends on i alone, the same for every run.
    eval_batch_size: evaluation batch size.
    samples: images drawn at the end (DDIM, from fixed noise) for the grid.
    sample_steps: DDIM steps per sample.
  """

  data: str | None = None
  cache_dir: str | None = None
  test_size: int | None = None
  val_size: int = 5000
  train_size: int | None = None
  flip: bool = True
  widths: tuple[int, ...] = (32, 64, 128)
  blocks: int = 1
  heads: int = 4
  groups: int = 8
  patch: int = 2
  timesteps: int = 1000
  optimizer: str = 'muon'
  optimizer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  head_names: tuple[str, ...] | None = None
  learning_rate: float = 0.01
  warmup_fraction: float = 0.1
  batch_size: int = 32
  steps: int = 2000
  seed: int = 0
  eval_every: int = 250
  eval_size: int = 2000
  eval_levels: int = 10
  eval_batch_size: int = 250
  samples: int = 64
  sample_steps: int = 50

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
  """The CIFAR-10 U-Net: 2.0M parameters, 2,000 steps of 32 images."""
  return Config()
