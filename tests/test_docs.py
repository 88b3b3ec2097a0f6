"""The API reference lists every public name."""

import pathlib

import muon_optax

_API = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'api.md'


def test_api_reference_lists_every_public_name():
  text = _API.read_text()
  missing = [
    n for n in muon_optax.__all__ if f'::: muon_optax.{n}\n' not in text
  ]
  assert not missing, f'docs/api.md lacks {missing}'
