"""The API reference lists every public name."""

import pathlib

import muon_optax

_API = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'api.md'


def test_api_reference_lists_every_public_name():
  text = _API.read_text()
  # Names loaded on first use are documented from their defining module.
  lazy = {n: '_flax_attention.' for n in muon_optax._FLAX_ATTENTION}
  missing = [
    n
    for n in muon_optax.__all__
    if f'::: muon_optax.{lazy.get(n, "")}{n}\n' not in text
  ]
  assert not missing, f'docs/api.md lacks {missing}'
