"""Bytes of a text file as tokens; train, validation and test splits.

The first 90% of the text is the training split; the last 10% is cut in two
halves, validation (the learning-rate choice) then test (the report).
"""

from collections.abc import Iterator
import os
import pathlib
import sysconfig
from typing import NamedTuple

import numpy as np

VOCAB_SIZE = 256  # bytes: any text file works, no vocabulary to build


class Corpus(NamedTuple):
  train: np.ndarray  # uint8 tokens
  val: np.ndarray
  test: np.ndarray
  source: str


def stdlib_text(max_bytes: int = 2_000_000) -> bytes:
  """Python's standard-library sources, sorted by name, capped in size.

  Needs no download; it depends on the Python version, which is part of the
  source description.
  """
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  chunks, size = [], 0
  for path in sorted(root.glob('*.py')):
    data = path.read_bytes()
    chunks.append(data)
    size += len(data)
    if size >= max_bytes:
      break
  return b''.join(chunks)[:max_bytes]


def load(
  data: str | os.PathLike | None = None,
  max_bytes: int = 2_000_000,
) -> Corpus:
  """Train: the first 90% of the text; validation and test: the two halves
  of the rest, in that order (disjoint, never trained on)."""
  if data is None:
    text = stdlib_text(max_bytes)
    source = f'Python {sysconfig.get_python_version()} stdlib *.py'
  else:
    path = pathlib.Path(data).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'`data` {str(path)!r} is not a text file.')
    text, source = path.read_bytes(), str(path)
  tokens = np.frombuffer(text, np.uint8)
  train_end = int(len(tokens) * 0.9)
  val_end = train_end + (len(tokens) - train_end) // 2
  return Corpus(
    tokens[:train_end], tokens[train_end:val_end], tokens[val_end:], source
  )


def batches(
  tokens: np.ndarray, batch_size: int, context: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless random windows: (inputs, next-byte targets), int32."""
  if len(tokens) <= context + 1:
    raise ValueError(
      f'The text ({len(tokens)} bytes) is shorter than `context` + 1.'
    )
  offsets = np.arange(context + 1)
  while True:
    starts = rng.integers(0, len(tokens) - context - 1, batch_size)
    windows = tokens[starts[:, None] + offsets].astype(np.int32)
    yield windows[:, :-1], windows[:, 1:]


def eval_windows(
  tokens: np.ndarray, context: int, max_windows: int
) -> tuple[np.ndarray, np.ndarray]:
  """Up to `max_windows` non-overlapping windows from the start of `tokens`."""
  n = min(max_windows, (len(tokens) - 1) // context)
  if n < 1:
    raise ValueError(
      f'The split ({len(tokens)} bytes) is shorter than `context`.'
    )
  x = tokens[: n * context].reshape(n, context).astype(np.int32)
  y = tokens[1 : n * context + 1].reshape(n, context).astype(np.int32)
  return x, y
