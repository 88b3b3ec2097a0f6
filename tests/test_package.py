"""The package's shape: imports run one way, optional libraries stay optional."""

import ast
import pathlib
import subprocess
import sys

_PKG = pathlib.Path(__file__).resolve().parents[1] / 'muon_optax'


def _imports(path: pathlib.Path) -> tuple[set[str], set[tuple[str, str]]]:
  """The package modules `path` imports, anywhere in it, and the private
  names it reads from them (`module._name`)."""
  tree = ast.parse(path.read_text())
  modules, aliases = set(), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == 'muon_optax':
      for a in node.names:
        modules.add(a.name)
        aliases[a.asname or a.name] = a.name
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
      'muon_optax.'
    ):
      modules.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith('muon_optax.'):
          modules.add(a.name.split('.')[1])
    elif (
      isinstance(node, ast.Call)
      and getattr(node.func, 'attr', None) == 'import_module'
      and node.args
      and isinstance(node.args[0], ast.Constant)
      and str(node.args[0].value).startswith('muon_optax.')
    ):
      modules.add(node.args[0].value.split('.')[1])
  private = {
    (aliases[n.value.id], n.attr)
    for n in ast.walk(tree)
    if isinstance(n, ast.Attribute)
    and isinstance(n.value, ast.Name)
    and n.value.id in aliases
    and n.attr.startswith('_')
  }
  return modules, private


def _graph():
  return {
    p.stem: _imports(p)[0] - {p.stem}
    for p in _PKG.glob('*.py')
    if p.stem != '__init__'
  }


def _find_cycle(graph):
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return stack + [node, nxt]
      if nxt not in state:
        found = visit(nxt, stack + [node])
        if found:
          return found
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [])
      if found:
        return found
  return None


def test_no_import_cycle_inside_the_package():
  graph = _graph()
  assert graph['_routing']  # the walk sees imports at all
  assert _find_cycle(graph) is None, _find_cycle(graph)


def test_cycle_finder_finds_a_planted_cycle():
  graph = dict(_graph())
  graph['_newton_schulz'] = set(graph['_newton_schulz']) | {'_alias'}
  assert _find_cycle(graph) is not None


def test_pure_maths_imports_no_transformation():
  graph = _graph()
  for pure in ('_coeffs', '_newton_schulz', '_metrics', '_views', '_paths'):
    assert not graph[pure] & {'_transform', '_alias', '_routing'}, pure


def test_no_module_reads_another_modules_private_names():
  for path in _PKG.glob('*.py'):
    assert not _imports(path)[1], path.name


def test_import_loads_no_model_library():
  code = (
    'import sys, muon_optax; '
    "bad = [m for m in ('flax', 'equinox') if m in sys.modules]; "
    'assert not bad, bad'
  )
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)
