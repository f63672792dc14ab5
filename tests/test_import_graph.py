"""The project's modules import each other without a cycle.

Read from the source (every `import`, at the top of a module or inside a
function), so a cycle cannot hide behind an import placed inside a function:
such a cycle works only while nobody imports the two modules in the other
order.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {'tavlo_jax': ROOT / 'tavlo_jax', 'tavlo_datasets': ROOT / 'datasets'}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package, folder in PACKAGES.items():
    for path in folder.rglob('*.py'):
      parts = path.relative_to(folder).with_suffix('').parts
      if parts[-1] == '__init__':
        parts = parts[:-1]
      out['.'.join((package,) + parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
  """Project modules `name` imports (`from pkg import mod` counts as mod)."""
  is_package = path.name == '__init__.py'
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = name.split('.')[:len(name.split('.')) - node.level + is_package]
        base = '.'.join(parent + ([base] if base else []))
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in known:
        target = target.rpartition('.')[0]
      if target and target != name:
        found.add(target)
  return found


def _cycle(graph) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycle_between_project_modules():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  # A package's __init__ importing its own submodules is how packages work;
  # the submodule importing the package back is the cycle this looks for.
  for name in graph:
    graph[name] = {m for m in graph[name] if not m.startswith(name + '.')}
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_the_graph_sees_imports_inside_functions(tmp_path):
  """The checker itself: an import inside a function is an edge too."""
  path = tmp_path / 'probe.py'
  path.write_text('def f():\n  from tavlo_jax.data import audio\n')
  got = _imports('probe', path, {'tavlo_jax.data.audio', 'tavlo_jax.data'})
  assert got == {'tavlo_jax.data.audio'}
  assert _cycle({'a': {'b'}, 'b': {'a'}}) == ['a', 'b', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None
