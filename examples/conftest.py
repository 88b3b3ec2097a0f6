"""Puts examples/ on sys.path (`import convnet`, `resnet`, `transformer`,
`compare`) and gives the examples' tests fast-compiling random keys."""

import pathlib
import sys

import jax
import pytest

_HERE = str(pathlib.Path(__file__).resolve().parent)
# Each `main.py` defines its absl flags on import, as Flax's examples do: they
# run as scripts (the tests start them in subprocesses), never imported here.
collect_ignore_glob = ['*/main.py']
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _rbg_keys():
  """'rbg' keys: XLA on a CPU compiles threefry's random bits for every new
  parameter shape in seconds, which dominated these tests; 'rbg' takes a
  fifth of that. Only the tests here (and their doctests) use it."""
  with jax.default_prng_impl('rbg'):
    yield
