"""The docs match the code: the API reference lists every public name, and
every Python block of the README and the docs pages runs."""

import pathlib

import mktestdocs
import pytest

import muon_optax

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_API = _ROOT / 'docs' / 'api.md'
_PAGES = [_ROOT / 'README.md', *sorted((_ROOT / 'docs').glob('*.md'))]


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


@pytest.mark.parametrize('page', _PAGES, ids=lambda p: p.name)
def test_code_blocks_run(page):
  """Each page's blocks run in order, sharing their names, as a reader
  would paste them; a block that should not run is not tagged `python`."""
  mktestdocs.check_md_file(page, memory=True)  # warnings are errors here
