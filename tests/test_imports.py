"""The package's import graph has no circles: each module's ``import deepflow...`` statements,
at module level or inside functions, are parsed (not run) and any cycle fails with its path."""
import ast
import os

import deepflow

PACKAGE = os.path.dirname(deepflow.__file__)


def modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package."""
  found = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = "deepflow." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def imports(path: str, known: dict[str, str]) -> set[str]:
  """The deepflow modules that ``path`` imports anywhere in its body. ``from deepflow.x import y``
  counts as importing ``deepflow.x.y`` when that is a module, else ``deepflow.x``. A package's
  ``__init__`` run implicitly before its submodules is not an edge: that is the registration
  rule (a package imports its own modules)."""
  def owner(name):
    while name and name not in known:
      name = name.rpartition(".")[0]
    return name

  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(owner(a.name) for a in node.names if a.name.startswith("deepflow"))
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and (
        node.module or "").startswith("deepflow"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in known else owner(node.module))
  return found - {""}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One path around each circle (depth-first search; a back edge closes a circle)."""
  found, state, stack = [], {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        found.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return found


def test_the_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c", "a"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
  known = modules()
  assert "deepflow.train.loop" in known and "deepflow.data" in known
  graph = {name: imports(path, known) - {name} for name, path in known.items()}
  assert graph["deepflow.cli"], "the parser found no imports at all"
  circles = cycles(graph)
  assert not circles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in circles)
