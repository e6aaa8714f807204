"""Which executor runs each strategy (the interface is in :mod:`minigun.work`).

A new strategy joins by writing its executor in a module of its own and registering it
here; ``Run`` asks only :func:`executor_for`.
"""

from __future__ import annotations

from typing import cast

from .aio import async_executor
from .forking import fork_call, reap_run
from .graph import Node
from .interpreters import interpreters_executor, spawn_interpreter_executor
from .plan import StagePlan
from .ray_executor import finish_ray_run, ray_executor, spawn_ray_executor
from .work import Executor, Run, StageCode, Work, WorkMode, in_process


def _forked(run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work:
    """spawn_fork and fork_ipc: the stage runs in forked children (minigun.forking)."""
    call, mode, threads, make_worker = fork_call(
        run, node, plan.strategy, plan.workers, code.call, plan.call_mode, code.start
    )
    return Work(call=call, mode=cast(WorkMode, mode), make_worker=make_worker, threads=threads)


EXECUTORS: dict[str, Executor] = {
    "inline": in_process,
    "threads": in_process,
    "spawn_thread": in_process,
    "spawn_fork": _forked,
    "fork_ipc": _forked,
    "async": async_executor,
    "interpreters": interpreters_executor,
    "spawn_interpreter": spawn_interpreter_executor,
    "ray": ray_executor,
    "spawn_ray": spawn_ray_executor,
}


def executor_for(strategy: str) -> Executor:
    """The executor of a canonical strategy name (``plan`` refused unavailable ones)."""
    return EXECUTORS[strategy]


def finish_run(run: Run) -> None:
    """Release what the executors kept for ``run`` once its worker threads are joined:
    its idle forked children, its Ray actors and connection."""
    reap_run(run)
    finish_ray_run(run)
