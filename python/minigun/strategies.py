"""Strategy names: where a stage's work runs (API.md section 2)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from .errors import DefinitionError, UnsupportedStrategy

if TYPE_CHECKING:
    from importlib import util as importlib_util
else:
    from .lazy_import import ImportedOnFirstUse

    importlib_util = ImportedOnFirstUse("importlib.util")  # only to look for an extra

CANONICAL = {
    "inline": "inline",
    "threads": "threads",
    "threaded": "threads",
    "fork_ipc": "fork_ipc",
    "ipc_fork": "fork_ipc",
    "interpreters": "interpreters",
    "ractor": "interpreters",
    "spawn_thread": "spawn_thread",
    "spawn_threads": "spawn_thread",
    "spawn_fork": "spawn_fork",
    "cow_fork": "spawn_fork",
    "spawn_forks": "spawn_fork",
    "fork_accumulate": "spawn_fork",
    "spawn_interpreter": "spawn_interpreter",
    "spawn_ractor": "spawn_interpreter",
    "spawn_ractors": "spawn_interpreter",
    "ractor_accumulate": "spawn_interpreter",
    "async": "async",
    "fibers": "async",
    "ray": "ray",
    "spawn_ray": "spawn_ray",
}

FORKING = frozenset({"fork_ipc", "spawn_fork"})
INTERPRETERS = frozenset({"interpreters", "spawn_interpreter"})
RAY = frozenset({"ray", "spawn_ray"})
#: Strategies that give every input item a worker of its own (a thread, a child).
PER_ITEM = frozenset({"spawn_thread", "spawn_fork"})

#: Strategies this version of minigun runs. The others are part of the API contract and
#: are rejected up front with UnsupportedStrategy rather than misbehaving at run time.
IMPLEMENTED = frozenset(
    {"inline", "threads", "spawn_thread", "spawn_fork", "fork_ipc", "async"} | INTERPRETERS | RAY
)

#: Where the subinterpreter API lives: the standard library from 3.14, the
#: ``backports.interpreters`` package (the ``[interpreters]`` extra) on 3.13.
INTERPRETERS_MODULE = (
    "concurrent.interpreters" if sys.version_info >= (3, 14) else "backports.interpreters"
)
INTERPRETERS_EXTRA = 'pip install "minigun-pipelines[interpreters]"'
RAY_EXTRA = 'pip install "minigun-pipelines[ray]"'


def _module_exists(name: str) -> bool:
    """Whether ``import name`` would find the module (without importing it)."""
    if name in sys.modules:
        return sys.modules[name] is not None  # None: import is blocked
    try:
        return importlib_util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing or blocked
        return False


def canonical(strategy: str, stage: str) -> str:
    """The canonical name of ``strategy``; DefinitionError for an unknown one."""
    try:
        return CANONICAL[strategy]
    except (KeyError, TypeError):
        names = ", ".join(sorted(set(CANONICAL.values())))
        raise DefinitionError(
            f"stage {stage!r}: unknown strategy {strategy!r}; use one of: {names}"
        ) from None


def check_available(strategy: str, stage: str) -> None:
    """Raise UnsupportedStrategy if this Python cannot run ``strategy``."""
    if strategy in FORKING and not hasattr(os, "fork"):
        raise UnsupportedStrategy(
            f"stage {stage!r}: strategy {strategy!r} needs os.fork(), which {sys.platform} "
            "lacks; use strategy='threads' instead"
        )
    if strategy in INTERPRETERS and sys.version_info < (3, 13):
        raise UnsupportedStrategy(
            f"stage {stage!r}: strategy {strategy!r} needs CPython 3.13 or newer "
            f"(this is {sys.version_info.major}.{sys.version_info.minor}); "
            "use 'fork_ipc' or 'threads' instead"
        )
    if strategy in INTERPRETERS and not _module_exists(INTERPRETERS_MODULE):
        raise UnsupportedStrategy(
            f"stage {stage!r}: strategy {strategy!r} needs the subinterpreter backport on "
            f"CPython {sys.version_info.major}.{sys.version_info.minor} "
            f"({INTERPRETERS_MODULE} is not installed); {INTERPRETERS_EXTRA}, or use "
            "'fork_ipc' or 'threads' instead"
        )
    if strategy in RAY and not _module_exists("ray"):
        raise UnsupportedStrategy(
            f"stage {stage!r}: strategy {strategy!r} needs Ray, which is not installed; "
            f"{RAY_EXTRA}, or use 'fork_ipc' or 'spawn_fork' to run on this machine only"
        )
    if strategy not in IMPLEMENTED:
        raise UnsupportedStrategy(
            f"stage {stage!r}: strategy {strategy!r} is not available in this version of "
            "minigun; use 'threads', 'spawn_thread', 'spawn_fork', 'fork_ipc', 'interpreters', "
            "'ray' or 'async'"
        )
