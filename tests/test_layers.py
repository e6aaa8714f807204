"""The package's modules import downward only: no import cycle, counting imports made
inside functions and under TYPE_CHECKING (a cycle hidden there is still a cycle)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "python" / "minigun"


def _imports(path: pathlib.Path) -> set[str]:
    """The sibling modules ``path`` imports (``from . import x``, ``from .x import y``,
    ``import minigun.x``), wherever in the file the import is."""
    found: set[str] = set()
    siblings = {p.stem for p in PACKAGE.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names if alias.name in siblings)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minigun."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("minigun."))
    return (found & siblings) - {path.stem, "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_modules_of_the_package_import_downward_only():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert graph["run"], "the import scan found nothing: it is broken"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_native_imports_the_extension():
    # A subinterpreter cannot load the extension: keeping its import in one module is what
    # lets `import minigun` work there (minigun.native stands in for it).
    importers = {
        p.stem
        for p in PACKAGE.glob("*.py")
        if "_minigun" in _imports(p) or "import _minigun" in p.read_text()
    }
    assert importers == {"native"}
