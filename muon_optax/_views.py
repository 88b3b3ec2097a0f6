"""Matrix views: how a parameter becomes a matrix, or a batch of matrices."""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _is_int(a: Any) -> bool:
  return isinstance(a, (int, np.integer)) and not isinstance(a, bool)


def _axes(
  axes: int | Sequence[int], what: str = 'MatrixView axes'
) -> tuple[int, ...]:
  if _is_int(axes):
    return (int(axes),)
  # A float axis would be truncated and a string split into characters.
  ok = isinstance(axes, Sequence) and not isinstance(axes, (str, bytes))
  if not ok or not all(_is_int(a) for a in axes):
    raise TypeError(
      f'{what} must be an int or a sequence of ints, got {axes!r}.'
    )
  return tuple(int(a) for a in axes)


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """Which axes of a parameter are the matrix's fan-in and fan-out.

  `reduction_axes` are contracted with the layer input (fan-in, the matrix
  rows), `output_axes` index the layer output (fan-out, the columns); every
  other axis is a batch axis, and each batch slice is its own matrix. Axes may
  be negative, which is what lets one view serve a layer and its stacked
  (scanned or vmapped) copy: `MatrixView.dense()` is `(in, out)` for a 2-D
  kernel and a batch of L such matrices for an `(L, in, out)` one.

  The layout is Flax's (`y = x @ W`); PyTorch's `(out, in)` weights would use
  `MatrixView((-1,), (-2,))`.
  """

  reduction_axes: tuple[int, ...]
  output_axes: tuple[int, ...]

  def __post_init__(self):
    for name in ('reduction_axes', 'output_axes'):
      axes = _axes(getattr(self, name), f'`MatrixView.{name}`')
      object.__setattr__(self, name, axes)

  @classmethod
  def dense(cls) -> 'MatrixView':
    """A `(fan_in, fan_out)` kernel; leading axes are stacked layers."""
    return cls((-2,), (-1,))

  @classmethod
  def conv(cls, num_spatial: int) -> 'MatrixView':
    """A `(*spatial, in, out)` kernel as one `(prod(spatial) * in, out)`."""
    return cls(tuple(range(-num_spatial - 2, -1)), (-1,))

  @classmethod
  def general(cls, num_in: int, num_out: int) -> 'MatrixView':
    """A `(*in_axes, *out_axes)` kernel, e.g. attention projections.

    `general(1, 2)` views a `(d, heads, head_dim)` query kernel as
    `(d, heads * head_dim)`; `general(2, 1)` views a `(heads, head_dim, d)`
    output kernel as `(heads * head_dim, d)`.
    """
    n = num_in + num_out
    return cls(tuple(range(-n, -num_out)), tuple(range(-num_out, 0)))

  def resolve(self, shape: Sequence[int]) -> 'ResolvedView':
    """Binds the view to a shape; raises ValueError if it does not fit."""
    ndim = len(shape)
    for ax in self.reduction_axes + self.output_axes:
      if not -ndim <= ax < ndim:
        raise ValueError(
          f'{self} has axis {ax}, out of range for shape {tuple(shape)}.'
        )
    red = tuple(a % ndim for a in self.reduction_axes)
    out = tuple(a % ndim for a in self.output_axes)
    if not red or not out:
      raise ValueError(f'{self} needs at least one reduction and output axis.')
    if len(set(red + out)) != len(red + out):
      raise ValueError(
        f'{self} repeats an axis or shares one between reduction and output '
        f'for shape {tuple(shape)}.'
      )
    batch = tuple(a for a in range(ndim) if a not in red + out)
    return ResolvedView(tuple(shape), batch, red, out)


@dataclasses.dataclass(frozen=True)
class ResolvedView:
  """A `MatrixView` bound to a shape: reshapes to and from (B, m, n)."""

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  output_axes: tuple[int, ...]

  @property
  def fan_in(self) -> int:
    return math.prod(self.shape[a] for a in self.reduction_axes)

  @property
  def fan_out(self) -> int:
    return math.prod(self.shape[a] for a in self.output_axes)

  @property
  def num_matrices(self) -> int:
    return math.prod(self.shape[a] for a in self.batch_axes)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    return (self.fan_in, self.fan_out)

  @property
  def _perm(self) -> tuple[int, ...]:
    return self.batch_axes + self.reduction_axes + self.output_axes

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """`x` of `shape` to `(num_matrices, fan_in, fan_out)`."""
    perm = self._perm
    if perm != tuple(range(len(perm))):
      x = jnp.transpose(x, perm)
    return x.reshape(self.num_matrices, self.fan_in, self.fan_out)

  def from_matrices(self, y: jax.Array) -> jax.Array:
    perm = self._perm
    y = y.reshape(tuple(self.shape[a] for a in perm))
    if perm != tuple(range(len(perm))):
      y = jnp.transpose(y, tuple(perm.index(a) for a in range(len(perm))))
    return y

  def describe(self) -> str:
    m, n = self.matrix_shape
    if self.num_matrices == 1 and not self.batch_axes:
      return f'{m}x{n}'
    return f'{self.num_matrices}x({m}x{n})'


def as_matrix_view(view: Any, what: str) -> MatrixView:
  """Accepts a MatrixView or optax.contrib.MuonDimensionNumbers."""
  if isinstance(view, MatrixView):
    return view
  if isinstance(view, optax.contrib.MuonDimensionNumbers):
    return MatrixView(_axes(view.reduction_axis), _axes(view.output_axis))
  raise TypeError(
    f'{what} must be a muon_optax.MatrixView, an '
    f'optax.contrib.MuonDimensionNumbers or None, got {view!r}.'
  )


def is_view_leaf(x: Any) -> bool:
  return x is None or isinstance(
    x, (MatrixView, optax.contrib.MuonDimensionNumbers)
  )


KELLER_JORDAN = 'keller_jordan'


def shape_scale(
  view: ResolvedView, consistent_rms: jax.typing.ArrayLike | str | None
) -> jax.typing.ArrayLike:
  """The factor of an orthogonalized update through `view`.

  With the view's `(fan_in, fan_out)`: `consistent_rms * sqrt(max(fan_in,
  fan_out))` (Moonlight: the update RMS of AdamW when `consistent_rms=0.2`);
  `sqrt(max(1, fan_out / fan_in))` when it is None (width scaling); with
  `'keller_jordan'`, `sqrt(max(1, A / B))` for the leaf's last two axes A, B,
  what KellerJordan/Muon's code computes on the raw gradient.
  """
  if isinstance(consistent_rms, str):  # KELLER_JORDAN, checked at construction
    rows, cols = view.shape[-2:]
    return math.sqrt(max(1.0, rows / cols))
  fan_in, fan_out = view.matrix_shape
  if consistent_rms is None:
    return math.sqrt(max(1.0, fan_out / fan_in))
  return consistent_rms * math.sqrt(max(fan_in, fan_out))
