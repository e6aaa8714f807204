"""The package's modules import downward only: no import cycle, counting imports made
inside functions and under TYPE_CHECKING (a cycle hidden there is still a cycle); and
``import minigun`` loads only what every run needs."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import textwrap

from _mg_helpers import PYTHON, subprocess_env

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


def _printed_last(script: str) -> object:
    """What ``script``, run in a fresh interpreter, printed last as JSON."""
    done = subprocess.run(
        [PYTHON, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


#: Loaded only by the runs that need them: each costs import time every user would pay.
LOADED_ON_FIRST_USE = [
    "minigun.forking",
    "minigun.fork_ipc",
    "minigun.spawn_fork",
    "minigun.interpreters",
    "minigun.ray_executor",
    "minigun.aio",
    "minigun.progress",
    "minigun.mermaid",
    "asyncio",
    "inspect",
    "dataclasses",
    "queue",
    "copy",
    "weakref",
    "math",
    "importlib.util",
    "logging",
    "pickle",
    "random",
    "difflib",
    "signal",
]


def test_import_minigun_leaves_executors_and_heavy_modules_to_their_first_use():
    # In a fresh interpreter: this session has long since imported all of them.
    script = textwrap.dedent(
        f"""
        import json, sys
        import minigun as mg
        watched = {LOADED_ON_FIRST_USE!r}
        at_import = [m for m in watched if m in sys.modules]
        p = mg.Pipeline("p")
        p.producer(lambda: range(3), name="source")
        p.processor(lambda x: x, name="work", strategy="fork_ipc")
        p.consumer(lambda x: None, name="sink")
        assert p.run().status == "ok"
        print(json.dumps([at_import, [m for m in watched if m in sys.modules]]))
        """
    )
    at_import, after_a_fork_run = _printed_last(script)
    assert at_import == [], f"import minigun loaded {at_import}"
    # The check sees a module once it is loaded: a fork_ipc run loads its executor.
    assert "minigun.fork_ipc" in after_a_fork_run


def test_a_task_of_plain_methods_runs_without_inspect_or_dataclasses():
    # Together a fifth of ``import minigun`` on 3.11: a stage that is a plain function or a
    # method has its form and parameters read off its code object instead.
    script = textwrap.dedent(
        """
        import json, sys
        import minigun as mg

        class Evens(mg.Stage):
            def process(self, x):
                if x % 2 == 0:
                    yield x

        class Job(mg.Task):
            @mg.producer
            def numbers(self, start=0):
                yield from range(start, start + 10)

            evens = Evens()

            @mg.accumulator(max_size=2)
            def pairs(self, batch):
                yield sum(batch)

            @mg.processor(threads=2)
            def double(self, x, *, factor=2):
                return x * factor

            @mg.consumer
            def sink(self, x):
                pass

        result = Job().run()
        assert result.status == "ok" and result.stats["sink"].items_in == 3, result.summary()
        print(json.dumps([m for m in ("inspect", "dataclasses") if m in sys.modules]))
        """
    )
    assert _printed_last(script) == []


def test_the_first_threads_run_of_a_process_loads_no_module():
    # A module a run imports is paid by the first run of every process: sysconfig, asked
    # whether the build is free-threaded, was 0.8 ms of it.
    script = textwrap.dedent(
        """
        import json, sys
        import minigun as mg
        p = mg.Pipeline("p")
        p.producer(lambda: range(3), name="source")
        p.processor(lambda x: x, name="work", threads=4)
        p.consumer(lambda x: None, name="sink")
        before = set(sys.modules)
        assert p.run().status == "ok"
        print(json.dumps(sorted(set(sys.modules) - before)))
        """
    )
    assert _printed_last(script) == []
