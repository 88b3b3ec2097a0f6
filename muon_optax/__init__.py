"""Muon for every architecture with weight matrices, as Optax transformations."""

import importlib

from muon_optax._alias import muon
from muon_optax._alias import normuon
from muon_optax._describe import describe
from muon_optax._diagnostics import diagnostics
from muon_optax._metrics import orthogonality_error
from muon_optax._newton_schulz import orthogonalize
from muon_optax._normuon import NorMuonState
from muon_optax._normuon import scale_by_normuon
from muon_optax._qk_clip import QKClipState
from muon_optax._qk_clip import qk_clip
from muon_optax._route import route
from muon_optax._routing import Routing
from muon_optax._trace import trace_routing
from muon_optax._transform import MuonState
from muon_optax._transform import scale_by_muon
from muon_optax._transform import scale_by_shape
from muon_optax._views import MatrixView

__version__ = '0.1.0'

# The Flax NNX attention helpers import flax: loaded on first use, so that
# `import muon_optax` never imports a model library.
_FLAX_ATTENTION = (
  'MaxLogit',
  'capture_max_logits',
  'collect_max_logits',
  'max_logit_attention',
)


def __getattr__(name: str):
  if name in _FLAX_ATTENTION:
    module = importlib.import_module('muon_optax._flax_attention')
    return getattr(module, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = (
  'MatrixView',
  'MaxLogit',
  'MuonState',
  'NorMuonState',
  'QKClipState',
  'Routing',
  'capture_max_logits',
  'collect_max_logits',
  'describe',
  'diagnostics',
  'max_logit_attention',
  'muon',
  'normuon',
  'orthogonality_error',
  'orthogonalize',
  'qk_clip',
  'route',
  'scale_by_muon',
  'scale_by_normuon',
  'scale_by_shape',
  'trace_routing',
)
