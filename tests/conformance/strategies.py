"""The strategies of the conformance matrix: one entry each.

A new strategy (interpreters, spawn_interpreter, ray, spawn_ray) joins the matrix by adding
one ``StrategyCase`` to ``REGISTRY``: the stage options that select it, how many workers it
may open, whether it runs ``async def`` forms, and when it can run at all.

A cell (strategy x form x scenario) that fails because of a known runtime defect is listed
in the entry's ``defects``: it runs as ``xfail(strict=True)``, so the fix turns it into an
XPASS, which fails the suite until the entry is removed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

#: The scenarios every runnable cell is tried under ("no_retry": a failed attempt without
#: retries= emits nothing either), and "reject" for a cell whose
#: combination must be refused with DefinitionError before anything runs.
SCENARIOS = ("handled", "retry", "no_retry", "unhandled", "cancel")
REJECT = "reject"


def _needs_fork() -> str | None:
    return None if hasattr(os, "fork") else "needs os.fork"


def _needs_ray() -> str | None:
    """Ray ships wheels for CPython with the GIL, not for free-threaded builds."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except ImportError:
        found = False
    return None if found else "needs ray (the [ray] extra; no wheels for free-threaded 3.13t)"


def _needs_interpreters() -> str | None:
    """Subinterpreters need CPython 3.13+, and the backport below 3.14."""
    if sys.version_info < (3, 13):
        return "subinterpreters need CPython 3.13+"
    module = "concurrent.interpreters" if sys.version_info >= (3, 14) else "backports.interpreters"
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    return None if found else f"needs {module} (the [interpreters] extra)"


@dataclass(frozen=True)
class StrategyCase:
    name: str
    #: Stage options that select the strategy (and its worker count).
    options: Mapping[str, object]
    #: The most workers (open()/close() pairs of a custom stage) one run of the stage opens;
    #: None for the per-item strategies, where each item's thread or child is its worker.
    max_workers: int | None
    #: True: runs the async def forms and rejects the plain ones; False: the reverse.
    runs_async: bool = False
    #: True: a Task method stage's Task instance is pickled into the worker. The matrix's
    #: Task classes are made inside a function (a subinterpreter imports classes by name)
    #: and hold the parent's locks (Ray's cloudpickle copies classes by value, but not
    #: locks), so those cells must be refused up front.
    pickles_task: bool = False
    #: True: the cells need the test session's Ray (marker ``ray``).
    needs_ray: bool = False
    #: A skip reason when this Python or platform cannot run the strategy, else None.
    unavailable: Callable[[], str | None] = lambda: None
    #: (form, scenario) -> the defect that makes the cell fail today. "*" matches any;
    #: the most specific key wins, and None there means "no defect" (an exception to a
    #: wildcard).
    defects: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def defect(self, form: str, scenario: str) -> str | None:
        for key in ((form, scenario), (form, "*"), ("*", scenario), ("*", "*")):
            if key in self.defects:
                return self.defects[key]
        return None

    def __str__(self) -> str:
        return self.name


# -- known runtime defects (issue 10), each with its minimal reproduction in the report ---------

#: Defects a cell shows only for some drawn examples: their cells are non-strict xfails.
INTERMITTENT: frozenset[str] = frozenset()

REGISTRY: list[StrategyCase] = [
    StrategyCase("inline", {"strategy": "inline"}, max_workers=1),
    StrategyCase("threads", {"strategy": "threads", "threads": 2}, max_workers=2),
    # A thread (child) per item, each a worker of its own: open/close once per item.
    StrategyCase("spawn_thread", {"strategy": "spawn_thread"}, max_workers=None),
    StrategyCase(
        "spawn_fork",
        {"strategy": "spawn_fork"},
        max_workers=None,
        unavailable=_needs_fork,
    ),
    StrategyCase(
        "fork_ipc",
        {"strategy": "fork_ipc", "processes": 2},
        max_workers=2,
        unavailable=_needs_fork,
    ),
    StrategyCase(
        "interpreters",
        {"strategy": "interpreters", "interpreters": 2},
        max_workers=2,
        pickles_task=True,
        unavailable=_needs_interpreters,
    ),
    StrategyCase(
        "spawn_interpreter",
        {"strategy": "spawn_interpreter"},
        max_workers=None,
        pickles_task=True,
        unavailable=_needs_interpreters,
    ),
    StrategyCase(
        "ray",
        {"strategy": "ray", "actors": 2},
        max_workers=2,
        pickles_task=True,
        needs_ray=True,
        unavailable=_needs_ray,
    ),
    StrategyCase(
        "spawn_ray",
        {"strategy": "spawn_ray"},
        max_workers=None,
        pickles_task=True,
        needs_ray=True,
        unavailable=_needs_ray,
    ),
    StrategyCase(
        "async",
        {"strategy": "async", "concurrency": 3},
        max_workers=1,
        runs_async=True,
    ),
]
