"""The process strategies' one entry point: the executor of every stage whose strategy
forks (``spawn_fork``, ``fork_ipc``) is :func:`forked_executor`, which returns the work
the Rust worker threads run instead of the stage function; a run's idle children are
reaped when it finishes (``RunForks.reap``, through ``work.finish_run``).

The concerns live below it, one module each (docs/forking.md): ``fork_safety`` (the fork
itself and the child's set-up), ``children`` (the parent's view of child processes, kept
in the Rust ``ChildTable``), ``budget`` (planning ``max_processes``), ``spawn_fork``
and ``fork_ipc`` (the two executors), and ``worker_loop`` (what a child runs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from .children import ForkStage, function_worker
from .fork_ipc import ipc_factory
from .graph import Node
from .plan import StagePlan
from .spawn_fork import spawn_fork_call
from .work import Run, StageCode, Work, WorkMode

__all__ = ["fork_call", "forked_executor"]


def forked_executor(run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work:
    """spawn_fork and fork_ipc: the stage runs in forked children."""
    call, mode, threads, make_worker = fork_call(
        run, node, plan.strategy, plan.workers, code.call, plan.call_mode, code.start
    )
    return Work(call=call, mode=cast(WorkMode, mode), make_worker=make_worker, threads=threads)


def fork_call(
    run: Any,
    node: Any,
    strategy: str,
    workers: int,
    call: Callable[[Any], Any] | None,
    mode: str,
    make_worker: Callable[[], tuple[Any, Any]] | None,
) -> tuple[Any, str, int, Any]:
    """Replace a fork stage's call for the runtime: returns ``(call, mode, workers,
    make_worker)``. The stage function (``call``, or ``make_worker`` for a custom Stage)
    then runs in forked children; the returned call runs in the parent's worker thread,
    forwards what the child emits, and reports each item's outcome to the runtime."""
    stage = ForkStage(run, node, mode)
    # The worker the child starts: a custom Stage's copy is made and opened in the child.
    if make_worker is not None:
        start = make_worker
    elif call is not None:
        start = function_worker(call)
    else:
        raise ValueError(f"fork_call: stage {node.path!r} has neither a call nor a worker")
    if strategy == "spawn_fork":
        # Each child is the stage's worker for one item, retries included: it opens,
        # processes and closes (a custom Stage), so what close() emits comes back once.
        # The parent's worker threads have nothing to open or close.
        workers = max(1, min(workers, stage.forks.plan.most_workers(stage.scopes)))
        return spawn_fork_call(stage, start), "chunk", workers, None
    if strategy == "fork_ipc":
        workers = stage.forks.plan.long_lived_workers.get(node.path, workers)
        # Items travel in the runtime's chunks; the child retries, the runtime counts.
        return None, "chunk", workers, ipc_factory(stage, start, stage.policy)
    raise ValueError(f"fork_call: {strategy!r} is not a fork strategy")
