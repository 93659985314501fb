"""Architecture: the modules of `stability/` import each other without a cycle, and no module
uses another module's underscore-prefixed names (`from m import _x` or `m._x`).

The checker parses the source (ast); it imports nothing. Every import counts, function-level
ones too (a lazy import still closes a circle). Importing `p.q.m` also runs the package
`p.q`'s __init__, so that is an edge too, except from a module inside `p.q`.
`SCOPES` names the packages held to this: all of `stability/`.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "stability"
SCOPES = ("stability",)


@dataclasses.dataclass(frozen=True)
class PrivateUse:
  importer: str  # the module that uses the name
  owner: str     # the module the name belongs to
  name: str
  line: int

  def __str__(self):
    return f"{self.importer}:{self.line} uses {self.owner}.{self.name}"


def find_modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py below root/package (__init__.py: the package)."""
  out = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _inside(module: str, package: str) -> bool:
  return module == package or module.startswith(package + ".")


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
  if not node.level:
    return node.module or ""
  base = importer.split(".") if is_package else importer.split(".")[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _module_imports(name: str, path: pathlib.Path, known: set[str]
                    ) -> tuple[set[str], list[PrivateUse]]:
  """(modules `name` imports, its uses of other modules' private names)."""
  tree = ast.parse(path.read_text(), str(path))
  is_package = path.name == "__init__.py"
  targets, bound, private = set(), {}, []  # bound: local name -> module it names

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name in known or a.name.split(".")[0] == PACKAGE:
          targets.add(a.name)
          bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      base = _resolve_from(node, name, is_package)
      if not _inside(base, PACKAGE):
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in known:
          targets.add(sub)
          bound[a.asname or a.name] = sub
        else:
          targets.add(base)
          if _is_private(a.name) and base != name:
            private.append(PrivateUse(name, base, a.name, node.lineno))

  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute):
      continue
    chain, inner = [node.attr], node.value
    while isinstance(inner, ast.Attribute):
      chain.append(inner.attr)
      inner = inner.value
    if not isinstance(inner, ast.Name) or inner.id not in bound:
      continue
    module = bound[inner.id]
    for attr in reversed(chain):
      if f"{module}.{attr}" in known:
        module = f"{module}.{attr}"
        continue
      if _is_private(attr) and module != name and module in known:
        private.append(PrivateUse(name, module, attr, node.lineno))
      break

  edges = set()
  for t in targets:
    parts = t.split(".")
    for k in range(1, len(parts) + 1):  # the module and the packages whose __init__ it runs
      m = ".".join(parts[:k])
      if m in known and m != name and (m == t or not _inside(name, m)):
        edges.add(m)
  return edges, sorted(set(private), key=str)


def import_graph(root: pathlib.Path, package: str = PACKAGE
                 ) -> tuple[dict[str, set[str]], list[PrivateUse]]:
  """{module: modules it imports} over root/package, and every private-name use across modules."""
  modules = find_modules(root, package)
  graph, private = {}, []
  for name, path in modules.items():
    graph[name], uses = _module_imports(name, path, set(modules))
    private += uses
  return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import cycles: strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def violations(root: pathlib.Path, scope: str) -> list[str]:
  """Cycles through, and private-name uses by or of, modules inside `scope`."""
  graph, private = import_graph(root)
  bad = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)
         if any(_inside(m, scope) for m in c)]
  bad += [str(p) for p in private if _inside(p.importer, scope) or _inside(p.owner, scope)]
  return bad


@pytest.mark.parametrize("scope", SCOPES)
def test_no_import_cycle_and_no_use_of_another_modules_private_names(scope):
  graph, _ = import_graph(ROOT)
  assert any(_inside(m, scope) for m in graph), f"no modules in {scope}"
  assert violations(ROOT, scope) == []


def test_the_checker_finds_a_lazy_import_cycle_and_private_uses(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from stability.sub import b\n")
  (pkg / "a.py").write_text("from stability.sub import b as b_lib\n\n"
                            "def f():\n  return b_lib._helper()\n")
  (pkg / "sub" / "b.py").write_text("def _helper():\n  return 1\n\n"
                                    "def g():\n  from stability import a\n  return a.f\n")
  (pkg / "c.py").write_text("from .sub.b import _helper\nimport stability.a\n"
                            "x = stability.a.__name__\n")
  graph, private = import_graph(tmp_path)
  assert graph["stability.a"] == {"stability.sub", "stability.sub.b"}
  assert graph["stability.sub"] == {"stability.sub.b"}
  assert cycles(graph) == [["stability.a", "stability.sub", "stability.sub.b"]]
  assert [str(p) for p in private] == ["stability.a:4 uses stability.sub.b._helper",
                                       "stability.c:1 uses stability.sub.b._helper"]
  assert violations(tmp_path, "stability.sub") == [
      "import cycle: stability.a <-> stability.sub <-> stability.sub.b",
      "stability.a:4 uses stability.sub.b._helper", "stability.c:1 uses stability.sub.b._helper"]
  assert violations(tmp_path, "stability.c") == ["stability.c:1 uses stability.sub.b._helper"]
