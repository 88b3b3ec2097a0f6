"""optax's own muon tests, run against muon_optax.

The tests are imported from the installed optax wheel (never copied): its
`contrib/_muon_test.py` and the muon entries of `contrib/_common_test.py`.
Each runs unchanged, with `optax.contrib.muon` swapped for muon_optax behind
`tests/optax_adapter.py`. Nothing is excluded.
"""

from unittest import mock

from optax.contrib import _common_test
from optax.contrib import _muon_test

from tests import optax_adapter


class OptaxMuonTest(_muon_test.MuonTest):
  """`optax/contrib/_muon_test.py` with `_muon` swapped for the adapter."""

  def setUp(self):
    super().setUp()
    patcher = mock.patch.object(_muon_test, '_muon', optax_adapter.module)
    patcher.start()
    self.addCleanup(patcher.stop)


_get_opt_factory = _common_test._get_opt_factory


def _factory(opt_name):
  if opt_name == 'muon':
    return optax_adapter.muon
  return _get_opt_factory(opt_name)


class OptaxCommonMuonTest(_common_test.ContribTest):
  """The muon entries of `optax/contrib/_common_test.py`."""

  def setUp(self):
    super().setUp()
    patcher = mock.patch.object(_common_test, '_get_opt_factory', _factory)
    patcher.start()
    self.addCleanup(patcher.stop)


def _is_muon_case(cls, name):
  params = getattr(getattr(cls, name), '__x_params_repr__', '')
  return "opt_name='muon'" in params


# Keep only the muon entries of the common tests, and drop the exclusions.
for _name in dir(_common_test.ContribTest):
  if _name.startswith('test') and not _is_muon_case(
    _common_test.ContribTest, _name
  ):
    setattr(OptaxCommonMuonTest, _name, None)
