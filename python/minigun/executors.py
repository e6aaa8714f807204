"""Which executor runs each strategy (the interface is in :mod:`minigun.work`).

A strategy's executor lives in a module of its own, imported when a run first uses the
strategy: a program that never forks, starts a subinterpreter or talks to Ray does not
load that machinery (nor pickle, traceback and uuid below it) with ``import minigun``.
A new strategy joins by writing its executor in a module of its own and naming it here;
``Run`` asks only :func:`executor_for`.
"""

from __future__ import annotations

import functools
import importlib
from typing import cast

from .work import Executor

#: The executor of each canonical strategy: (module of minigun, function).
EXECUTORS: dict[str, tuple[str, str]] = {
    "inline": ("work", "in_process"),
    "threads": ("work", "in_process"),
    "spawn_thread": ("work", "in_process"),
    "spawn_fork": ("forking", "forked_executor"),
    "fork_ipc": ("forking", "forked_executor"),
    "async": ("aio", "async_executor"),
    "interpreters": ("interpreters", "interpreters_executor"),
    "spawn_interpreter": ("interpreters", "spawn_interpreter_executor"),
    "ray": ("ray_executor", "ray_executor"),
    "spawn_ray": ("ray_executor", "spawn_ray_executor"),
}


@functools.cache
def executor_for(strategy: str) -> Executor:
    """The executor of a canonical strategy name (``plan`` refused unavailable ones)."""
    module, name = EXECUTORS[strategy]
    return cast(Executor, getattr(importlib.import_module(f"minigun.{module}"), name))
