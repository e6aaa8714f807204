"""The strategies of the conformance matrix: one entry each.

A new strategy (interpreters, spawn_interpreter, ray, spawn_ray) joins the matrix by adding
one ``StrategyCase`` to ``REGISTRY``: the stage options that select it, how many workers it
may open, whether it runs ``async def`` forms, and when it can run at all.

A cell (strategy x form x scenario) that fails because of a known runtime defect is listed
in the entry's ``defects``: it runs as ``xfail(strict=True)``, so the fix turns it into an
XPASS, which fails the suite until the entry is removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

#: The scenarios every runnable cell is tried under ("no_retry": a failed attempt without
#: retries= emits nothing either), and "reject" for a cell whose
#: combination must be refused with DefinitionError before anything runs.
SCENARIOS = ("handled", "retry", "no_retry", "unhandled", "cancel")
REJECT = "reject"


def _needs_fork() -> str | None:
    return None if hasattr(os, "fork") else "needs os.fork"


@dataclass(frozen=True)
class StrategyCase:
    name: str
    #: Stage options that select the strategy (and its worker count).
    options: Mapping[str, object]
    #: The most workers (open()/close() pairs of a custom stage) one run of the stage opens.
    max_workers: int
    #: True: runs the async def forms and rejects the plain ones; False: the reverse.
    runs_async: bool = False
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

FAILED_ATTEMPT_EMITS = (
    "without retries=, what a failed attempt emitted before raising is delivered downstream "
    "(emits are held only when retries > 0)")
CLOSE_SKIPPED = (
    "a custom Stage's close() is not called on its workers when the run fails or is "
    "cancelled (open() was)")
SPAWN_THREAD_STAGE = "a custom mg.Stage with strategy='spawn_thread': process() is never called"
ASYNC_LOOP_LEAK = (
    "a failed or cancelled run never closes its async stage's event loop: 3 fds left per run")
ASYNC_PROCESS = (
    "a custom Stage whose process is async def is called like a plain function: its "
    "coroutine objects are emitted unawaited (one worker per concurrency slot), pickled "
    "(fork_ipc: TypeError) or lost (spawn_fork: exit code 70), instead of running on the "
    "event loop, or DefinitionError up front for strategies without one")
ASYNC_PLAIN_STAGE = (
    "a custom Stage with a plain def process and strategy='async' is not refused: it runs "
    "on concurrency= threads instead of raising DefinitionError like a plain function does")
SPAWN_FORK_CLOSE = (
    "spawn_fork with a custom Stage runs process() in a throw-away child and close() on the "
    "parent's copy: what process() buffered for close() is lost")

_REFUSES_ASYNC_STAGE = {("async_stage", "reject"): ASYNC_PROCESS}
#: The return form emits nothing before it raises, so it has nothing to discard.
_COMMON = {("*", "no_retry"): FAILED_ATTEMPT_EMITS, ("return", "no_retry"): None,
           **_REFUSES_ASYNC_STAGE}
_CLOSE_ON_STOP = {
    ("stage", "unhandled"): CLOSE_SKIPPED, ("stage", "cancel"): CLOSE_SKIPPED,
    ("buffering_stage", "unhandled"): CLOSE_SKIPPED, ("buffering_stage", "cancel"): CLOSE_SKIPPED,
}

REGISTRY: list[StrategyCase] = [
    StrategyCase("inline", {"strategy": "inline"}, max_workers=1,
                 defects={**_COMMON, **_CLOSE_ON_STOP}),
    StrategyCase("threads", {"strategy": "threads", "threads": 2}, max_workers=2,
                 defects={**_COMMON, **_CLOSE_ON_STOP}),
    # max_threads (default 5) bounds a spawn_thread stage's threads alive at once.
    StrategyCase("spawn_thread", {"strategy": "spawn_thread"}, max_workers=5,
                 defects={**_COMMON, ("stage", "*"): SPAWN_THREAD_STAGE,
                          ("buffering_stage", "*"): SPAWN_THREAD_STAGE}),
    # max_processes (default 2) bounds the children of a spawn_fork stage.
    StrategyCase("spawn_fork", {"strategy": "spawn_fork"}, max_workers=2,
                 unavailable=_needs_fork,
                 defects={**_COMMON, **_CLOSE_ON_STOP,
                          ("buffering_stage", "*"): SPAWN_FORK_CLOSE}),
    StrategyCase("fork_ipc", {"strategy": "fork_ipc", "processes": 2}, max_workers=2,
                 unavailable=_needs_fork, defects={**_COMMON, **_CLOSE_ON_STOP}),
    StrategyCase("async", {"strategy": "async", "concurrency": 3}, max_workers=1,
                 runs_async=True,
                 defects={("*", "no_retry"): FAILED_ATTEMPT_EMITS,
                          ("*", "unhandled"): ASYNC_LOOP_LEAK, ("*", "cancel"): ASYNC_LOOP_LEAK,
                          ("async_stage", "*"): ASYNC_PROCESS,
                          ("stage", "reject"): ASYNC_PLAIN_STAGE,
                          ("buffering_stage", "reject"): ASYNC_PLAIN_STAGE}),
]
