"""Muon for every architecture with weight matrices, as Optax transformations."""

from muon_optax._alias import muon
from muon_optax._coeffs import resolve_ns_coeffs
from muon_optax._newton_schulz import default_compute_dtype
from muon_optax._newton_schulz import orthogonalize
from muon_optax._routing import matrix_views
from muon_optax._routing import param_labels
from muon_optax._transform import MuonState
from muon_optax._transform import default_group_strategy
from muon_optax._transform import scale_by_muon
from muon_optax._views import MatrixView

__version__ = '0.1.0'

__all__ = (
  'MatrixView',
  'MuonState',
  'default_compute_dtype',
  'default_group_strategy',
  'matrix_views',
  'muon',
  'orthogonalize',
  'param_labels',
  'resolve_ns_coeffs',
  'scale_by_muon',
)
