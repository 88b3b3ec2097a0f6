"""Muon for every architecture with weight matrices, as Optax transformations."""

from muon_optax._alias import muon
from muon_optax._coeffs import resolve_ns_coeffs
from muon_optax._diagnostics import UpdateStatsState
from muon_optax._diagnostics import diagnostics
from muon_optax._diagnostics import record_update_stats
from muon_optax._metrics import orthogonality_error
from muon_optax._newton_schulz import default_compute_dtype
from muon_optax._newton_schulz import orthogonalize
from muon_optax._routing import Routing
from muon_optax._routing import describe
from muon_optax._routing import matrix_views
from muon_optax._routing import param_labels
from muon_optax._transform import MuonState
from muon_optax._transform import default_group_strategy
from muon_optax._transform import scale_by_muon
from muon_optax._transform import scale_by_shape
from muon_optax._views import MatrixView

__version__ = '0.1.0'

__all__ = (
  'MatrixView',
  'MuonState',
  'Routing',
  'UpdateStatsState',
  'default_compute_dtype',
  'default_group_strategy',
  'describe',
  'diagnostics',
  'matrix_views',
  'muon',
  'orthogonality_error',
  'orthogonalize',
  'param_labels',
  'record_update_stats',
  'resolve_ns_coeffs',
  'scale_by_muon',
  'scale_by_shape',
)
