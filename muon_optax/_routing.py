"""Routing: which parameters get Muon, through which matrix view, and why.

Four sources say what each leaf is, each as a `Decision` per leaf path:

- the model's computation (`muon_optax.trace_routing`, `_trace.py`);
- a Flax NNX module's layer types (`_nnx.py`);
- an Equinox module's layer types (`_equinox.py`);
- a plain tree's names and shapes (`_names.py`).

One function, `finish`, turns any source's decisions into a `Routing`: user
overrides, where the output head goes, the degenerate-matrix rule, a check
that every override pattern matched, and warnings where the result looks
wrong (`refinish` does it again with other options). `muon_optax.route`
(`_route.py`) picks the source for an object. This module decides; it never
computes an update.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import os
import sys
from typing import Any
from typing import NamedTuple
import warnings

import jax

from muon_optax import _paths
from muon_optax import _views
from muon_optax._views import MatrixView

MUON = 'muon'
ADAM = 'adam'
LABELS = (MUON, ADAM)

# What a source says a leaf is.
MATRIX = 'matrix'  # a weight matrix: Muon, unless degenerate or overridden
HEAD = 'head'  # the output head: where `head` says (Adam by default)
OTHER = 'other'  # anything else (bias, norm, embedding, ...): Adam

#: Path components (fnmatch, case-insensitive) that mark the output head.
HEAD_NAMES: tuple[str, ...] = (
  'head',
  'lm_head',
  '*_head',
  'classifier',
  'logit*',
  'output_layer',
  'output_projection',
  'fc',  # torchvision's ResNet head; its MLPs say fc1, fc2, c_fc
)
#: Path components (fnmatch, case-insensitive) that mark an embedding table.
EMBED_NAMES: tuple[str, ...] = ('*embed*', '*_emb', 'emb', 'wte', 'wpe')
#: timm's rule for matrices too thin for Muon (pytorch-image-models #2580).
MIN_SIDE = 4
MAX_ASPECT = 128
#: More leaves than this marked as output heads looks wrong (a warning).
MAX_HEADS = 3


class Decision(NamedTuple):
  """What a source says of one leaf, before `finish`.

  Attributes:
    kind: `MATRIX` (a weight matrix), `HEAD` (the output head, a matrix) or
      `OTHER` (Adam).
    view: the matrix view the leaf was read with, or None.
    why: the reason, a short phrase.
    guessed: the view's layout is a guess from the shape alone.
    conv: the leaf is a convolution kernel.
  """

  kind: str
  view: MatrixView | None
  why: str
  guessed: bool = False
  conv: bool = False


class Rule(NamedTuple):
  """One leaf's finished routing: label, matrix view and why."""

  label: str
  view: MatrixView | None
  why: str


@dataclasses.dataclass(frozen=True)
class Source:
  """A source's decisions about every leaf of a params tree.

  `paths` is a tree with the structure the routing's trees take (the params'
  structure, an NNX Variable counting as a leaf), holding each leaf's path;
  `shapes` maps paths to `jax.ShapeDtypeStruct`s; `attention` maps the path
  of each attention layer found to its (query kernel, key kernel) paths;
  `notes` are the source's own warnings.
  """

  name: str
  paths: Any
  shapes: Mapping[str, jax.ShapeDtypeStruct]
  decisions: Mapping[str, Decision]
  attention: Mapping[str, tuple[str, str]] = dataclasses.field(
    default_factory=dict
  )
  notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Routing:
  """Which parameters get Muon, through which matrix view, and why.

  Three trees with the structure of the params: `labels` (`'muon'` or
  `'adam'`), `views` (a `MatrixView`, None where there is no matrix) and
  `reasons` (a short phrase each). An Adam leaf keeps the view it was read
  with where it has one (an output head, a depthwise or degenerate kernel).
  `muon(lr, param_labels=routing)` takes labels and views together;
  `describe(routing)` prints it; `route(routing, head='muon', ...)` finishes
  its source's decisions again with other options.

  A `Routing` is plain data, one opaque value to JAX and optax (not a pytree,
  not callable), so `optax.inject_hyperparams(muon)` keeps it static.

  Attributes:
    labels: a tree of `'muon'` / `'adam'`.
    views: a tree of `MatrixView` or None.
    reasons: a tree of strings.
    shapes: a tree of `jax.ShapeDtypeStruct`s, the params'.
    source: what decided: `'trace'`, `'nnx'`, `'equinox'` or `'names'`.
    warnings: what looked wrong, as warned when the routing was made.
    attention: `{layer path: (query kernel path, key kernel path)}` of the
      attention layers the source found (used by `qk_clip`).
  """

  labels: Any
  views: Any
  reasons: Any
  shapes: Any
  source: str = 'names'
  warnings: tuple[str, ...] = ()
  attention: Mapping[str, tuple[str, str]] = dataclasses.field(
    default_factory=dict
  )
  # The source's decisions and the options `finish` applied, so that
  # `route(routing, ...)` can finish them again.
  decisions: Mapping[str, Decision] = dataclasses.field(
    default_factory=dict, repr=False
  )
  options: Mapping[str, Any] = dataclasses.field(
    default_factory=dict, repr=False
  )

  def by_path(self) -> dict[str, Rule]:
    """`{path: Rule(label, view, why)}`, paths as the rest of muon_optax.

    Paths are '/'-joined keys with an NNX Variable's `.value` dropped, e.g.
    `'blocks/0/attn/query/kernel'`.
    """
    labels = _paths.leaves_with_paths(self.labels)
    # Up to the labels' structure: a None view is a leaf here.
    structure = jax.tree.structure(self.labels)
    views = structure.flatten_up_to(self.views)
    reasons = structure.flatten_up_to(self.reasons)
    return {
      path: Rule(label, view, reason)
      for (path, label), view, reason in zip(
        labels, views, reasons, strict=True
      )
    }

  def muon_views(self) -> Any:
    """`views` with None on every Adam leaf."""
    return jax.tree.map(
      lambda label, view: view if label == MUON else None,
      self.labels,
      self.views,
    )

  def __repr__(self) -> str:
    labels = [rule.label for rule in self.by_path().values()]
    return (
      f'Routing({labels.count(MUON)} muon leaves, '
      f'{labels.count(ADAM)} adam leaves, from {self.source})'
    )

  __str__ = __repr__


# -- the finishing step ---------------------------------------------------

_DEFAULT_OPTIONS: dict[str, Any] = {
  'views': None,
  'overrides': None,
  'view_overrides': None,
  'head': ADAM,
  'min_side': MIN_SIDE,
  'max_aspect': MAX_ASPECT,
}


def _check_options(options: Mapping[str, Any]) -> None:
  head = options['head']
  if head not in LABELS:
    raise ValueError(f"`head` must be 'adam' or 'muon', got {head!r}.")
  for pattern, label in (options['overrides'] or {}).items():
    if label not in LABELS:
      raise ValueError(
        f'`overrides[{pattern!r}]` is {label!r}; the labels are {list(LABELS)}.'
      )
  for pattern, view in (options['view_overrides'] or {}).items():
    if view is not None:
      _views.as_matrix_view(view, f'`view_overrides[{pattern!r}]`')
  # min_side 0 would divide by a zero side; max_aspect < 1 sends every
  # matrix to Adam.
  min_side, max_aspect = options['min_side'], options['max_aspect']
  if not min_side >= 1:
    raise ValueError(f'`min_side` must be at least 1, got {min_side=}.')
  if not max_aspect >= 1:
    raise ValueError(f'`max_aspect` must be at least 1, got {max_aspect=}.')


def is_degenerate(
  matrix_shape: tuple[int, int],
  *,
  min_side: int = MIN_SIDE,
  max_aspect: float = MAX_ASPECT,
) -> bool:
  """A matrix so thin that its polar factor is no useful update direction."""
  m, n = matrix_shape
  lo, hi = min(m, n), max(m, n)
  return lo < min_side or hi / lo > max_aspect


def _listing(paths: Sequence[str], limit: int = 8) -> str:
  shown = ', '.join(repr(p) for p in paths[:limit])
  more = len(paths) - limit
  return shown + (f' and {more} more' if more > 0 else '')


def _looks_wrong(
  source: Source, rules: Mapping[str, Rule], guessed: Sequence[str]
) -> list[str]:
  """Warnings for routings that look wrong, measured on real models."""
  notes = list(source.notes)
  heads = [p for p, d in source.decisions.items() if d.kind == HEAD]
  conv_heads = [p for p in heads if source.decisions[p].conv]
  if len(heads) > MAX_HEADS:
    notes.append(
      f'{len(heads)} matrices are marked as output heads ({_listing(heads)}): '
      'a model has one or a few. If the traced function returns more than '
      'predictions or a loss (hidden states, features), trace one that '
      "returns the predictions, or finish with `route(routing, head='muon', "
      "overrides={'<real head>': 'adam'})`."
    )
  elif conv_heads and (len(conv_heads) > 1 or len(heads) > len(conv_heads)):
    notes.append(
      f'Conv kernels are marked as output heads ({_listing(conv_heads)}) '
      'beside other heads: a conv is a head only in a model whose last layer '
      'is a conv (a U-Net, a segmentation head). Check what the traced '
      'function returns, or override them.'
    )
  matrices = [p for p, s in source.shapes.items() if len(s.shape) >= 2]
  if matrices and not any(r.label == MUON for r in rules.values()):
    notes.append(
      f'No parameter is on Muon, of {len(matrices)} with two or more axes '
      f'({_listing(matrices)}); every parameter trains with Adam. See '
      '`describe` for why each went there.'
    )
  if guessed:
    notes.append(
      f'The layouts of {len(guessed)} leaves with three or more axes are '
      f'guessed from their shapes ({_listing(guessed)}): nothing in their '
      'names says which axes are fan-in, fan-out or stacked layers, so their '
      'Muon views, or the degenerate-matrix rule that sent them to Adam, may '
      'be wrong. Read them from the computation with '
      '`muon_optax.trace_routing`, or give `view_overrides` (and `stacked` '
      'for scanned layers).'
    )
  return notes


def warn(message: str) -> None:
  """A `UserWarning` attributed to the first caller outside muon_optax;
  Python's default filter prints each message once per calling line."""
  package = os.path.dirname(os.path.abspath(__file__))
  level, frame = 2, sys._getframe(1)
  while frame is not None and frame.f_code.co_filename.startswith(package):
    level, frame = level + 1, frame.f_back
  warnings.warn(message, UserWarning, stacklevel=level)


def finish(source: Source, **options: Any) -> Routing:
  """Turns a source's decisions into a `Routing`.

  Per leaf, in order: `views` (`{path: MatrixView}`, views the user gave
  `muon` by path) and `view_overrides`; the label (`MATRIX` to Muon, `HEAD`
  to `head`, `OTHER` to Adam); the degenerate-matrix rule (`min_side`,
  `max_aspect`) for leaves bound for Muon; `overrides`. An override pattern
  that matches no leaf is an error. Warns (once) where the result looks
  wrong.
  """
  unknown = set(options) - set(_DEFAULT_OPTIONS)
  if unknown:
    raise TypeError(f'Unknown routing options {sorted(unknown)}.')
  options = {**_DEFAULT_OPTIONS, **options}
  _check_options(options)
  overrides = dict(options['overrides'] or {})
  view_overrides = {
    pattern: None if view is None else _views.as_matrix_view(view, pattern)
    for pattern, view in (options['view_overrides'] or {}).items()
  }
  given_views = dict(options['views'] or {})
  rules: dict[str, Rule] = {}
  guessed = []
  for path, d in source.decisions.items():
    shape = tuple(source.shapes[path].shape)
    view, why, guess = d.view, d.why, d.guessed
    if path in given_views:
      view, why, guess = given_views[path], 'matrix_views', False
    hit = _paths.match_pattern(view_overrides, path)
    if hit is not None:
      view, why, guess = hit[1], f'view override {hit[0]!r}', False
    if guess:
      guessed.append(path)
    label = {MATRIX: MUON, HEAD: options['head'], OTHER: ADAM}[d.kind]
    if d.kind == HEAD:
      kept = ", kept on Muon (head='muon')" if label == MUON else ''
      why = f'output head{kept}; {why}'
    if label == MUON:
      if view is None:
        label, why = ADAM, f'no matrix view; {why}'
      else:
        try:
          resolved = view.resolve(shape)
        except ValueError as e:
          raise ValueError(f'Parameter {path!r}: {e}') from None
        if is_degenerate(
          resolved.matrix_shape,
          min_side=options['min_side'],
          max_aspect=options['max_aspect'],
        ):
          label, why = ADAM, f'degenerate {resolved.describe()}; {why}'
    hit = _paths.match_pattern(overrides, path)
    if hit is not None:
      label, why = hit[1], f'override {hit[0]!r}; {why}'
      if label == MUON:
        if view is None:
          raise ValueError(
            f'`overrides` puts {path!r} (shape {shape}) on Muon, but it has '
            'no matrix view; give it one with `view_overrides`.'
          )
        try:
          view.resolve(shape)
        except ValueError as e:
          raise ValueError(f'Parameter {path!r}: {e}') from None
    if path in guessed and label == ADAM and (d.kind == HEAD or hit):
      guessed.remove(path)  # on Adam as a head or by override: no view used
    rules[path] = Rule(label, view, why)
  unmatched = [
    pattern
    for pattern in [*overrides, *view_overrides]
    if not any(_paths.match_pattern({pattern: None}, p) for p in rules)
  ]
  if unmatched:
    raise ValueError(
      f'The override patterns {unmatched} match no parameter; the paths are '
      f'{sorted(rules)[:20]}{" ..." if len(rules) > 20 else ""}.'
    )
  notes = _looks_wrong(source, rules, guessed)
  for note in notes:
    warn(note)

  def tree(field):
    return jax.tree.map(lambda p: getattr(rules[p], field), source.paths)

  given = {k: v for k, v in options.items() if v != _DEFAULT_OPTIONS[k]}
  return Routing(
    labels=tree('label'),
    views=tree('view'),
    reasons=tree('why'),
    shapes=jax.tree.map(lambda p: source.shapes[p], source.paths),
    source=source.name,
    warnings=tuple(notes),
    attention=dict(source.attention),
    decisions=dict(source.decisions),
    options=given,
  )


def refinish(routing: Routing, **options: Any) -> Routing:
  """`routing`'s source decisions, finished again: the options it was made
  with, updated by `options`."""
  if not routing.decisions:
    raise ValueError(
      'This Routing holds no source decisions to finish again (it was made '
      'by hand); build it with `route` or `trace_routing`.'
    )
  paths = jax.tree_util.tree_map_with_path(
    lambda kp, _: _paths.path_str(kp), routing.labels
  )
  shapes = dict(_paths.leaves_with_paths(routing.shapes))
  source = Source(
    routing.source,
    paths,
    shapes,
    routing.decisions,
    routing.attention,
  )
  return finish(source, **{**routing.options, **options})
