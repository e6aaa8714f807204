"""Child processes as the parent sees them: forking one for a stage, reading its frames
back, turning what it reported into exceptions, and ending and reaping it.

The books are kept in the Rust runtime (``_minigun.ChildTable``, one per run): the process
budget of every pipeline scope, the table of live children, each child's pipes and exit.
Every wait there is made without the GIL and wakes on the run's shutdown signal, so a
cancelled run stops waiting for room or for a child at once. This module is the Python
side: what a fork stage needs (:class:`ForkStage`), the fork with its hooks, decoding the
frames, logging, and the run-wide clean-up (:meth:`RunForks.reap`, and an ``atexit`` hook
for runs never finished).
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from . import hooks as _hooks
from . import log
from . import worker_loop as loop
from .budget import PROCESSES, BudgetPlan
from .config import RetryPolicy
from .errors import WorkerError
from .fork_safety import fork_child, interruptible
from .native import ext
from .work import PerRun
from .worker_reply import read_reply, worker_exception

#: Seconds a child gets to exit after SIGTERM before SIGKILL.
GRACE = 1.0

#: What a wait raises when the run stops first (the runtime ignores errors of a stopping
#: run).
RunStopping = ext.RunStopping


class RunForks:
    """A run's process budget (planned here) and its table of children (kept in Rust)."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.plan = BudgetPlan(run.graph, run.plans, PROCESSES)
        self.table = ext.ChildTable(self.plan.limit, self.plan.reserved)
        self._watching = False
        self._lock = threading.Lock()

    def watch(self) -> None:
        """Have the table's waits wake on the run's shutdown signal (once the runtime
        exists, which is before any stage runs)."""
        if self._watching:
            return
        with self._lock:
            if not self._watching:
                self.table.watch(self.run.runtime)
                self._watching = True

    def reap(self) -> None:
        """End and reap every child the run still has (idle fork_ipc workers of a
        cancelled or failed run), and close the table. Called (through
        ``work.finish_run``) once the run's worker threads are joined."""
        for child in self.table.live():
            kill(child)
        self.table.close()


_runs: PerRun[RunForks] = PerRun(RunForks, finish=RunForks.reap)


def run_forks(run: Any) -> RunForks:
    """The process budget and child table of ``run`` (made on first use)."""
    return _runs.of(run)


@atexit.register
def _reap_all_at_exit() -> None:
    """Last resort when the interpreter exits while runs still have children (a run
    abandoned by a second Ctrl-C, or a background run never waited for): end them."""
    for forks in _runs.every():
        for child in forks.table.live():
            try:
                child.kill(0.2)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass


class ForkStage:
    """What the parent and its children need to run one fork stage."""

    def __init__(self, run: Any, node: Any, mode: str) -> None:
        self.run = run
        self.path: str = node.path
        self.mode = mode
        self.before = _hooks.for_node(node, _hooks.BEFORE_FORK)
        self.after = _hooks.for_node(node, _hooks.AFTER_FORK)
        self.send_back = bool(node.downstream) or bool(node.scope.settings["use_ipc"])
        #: The names ``emit(to=)`` accepts, checked in the child as the runtime does.
        self.routes = frozenset(node.route_names)
        self.route_error = run.graph.route_error(node)
        self.scopes = [id(s) for s in node.scope.lineage()]
        self.policy = RetryPolicy(node.stage, node.scope.settings)
        self.forks = run_forks(run)
        self.table = self.forks.table

    def ready(self) -> None:
        """Called before the stage's first wait or fork (the run has its runtime then)."""
        self.forks.watch()

    def check_stop(self) -> None:
        """No new child once the run is stopping."""
        if self.run.stopping:
            raise RunStopping(f"stage {self.path!r}: the run is stopping")


def function_worker(call: loop.Call) -> loop.Start:
    """The worker start of a function stage: nothing to open or close."""

    def start() -> tuple[loop.Call, None]:
        return call, None

    return start


def with_hooks(after: list[Callable[[], Any]], start: loop.Start) -> loop.Start:
    """The child's worker start: the after_fork hooks, then the worker's own start; its
    item call is one that the parent's SIGTERM interrupts (see fork_safety)."""

    def start_after_fork() -> tuple[loop.Call, Callable[[], Any] | None]:
        for hook in after:
            hook()
        call, close = start()
        return (interruptible(call) if call is not None else call), close

    return start_after_fork


def spawn(
    stage: ForkStage,
    n_items: int,
    child_main: Callable[..., int],
    args: tuple[Any, ...],
    duplex: bool,
) -> Any:
    """Run the before_fork hooks and fork a child that runs ``child_main(wfd, [rfd,]
    *args)`` and exits. Returns the parent's handle on it (a ``_minigun.Child``, in the
    run's table)."""
    for hook in stage.before:
        hook()
    table = stage.table

    def adopt(pid: int, rfd: int, wfd: int | None) -> Any:
        return table.add(pid, rfd, wfd, stage.path, n_items)

    child = fork_child(child_main, args, duplex, adopt)
    if log.debug_enabled():
        if duplex:
            log.debug("fork: stage %r started fork_ipc worker pid %d", stage.path, child.pid)
        else:
            log.debug(
                "fork: stage %r started child pid %d for %d item(s)",
                stage.path,
                child.pid,
                n_items,
            )
    return child


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        return f"signal {sig} ({name})"
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    return f"status {status}"


def _log_exit(child: Any, status: int) -> None:
    if log.debug_enabled():
        log.debug(
            "exit: child pid %d of stage %r ended with %s after %.3fs (%d item(s))",
            child.pid,
            child.stage,
            describe(status),
            child.lifetime,
            child.items,
        )


def wait(child: Any) -> int:
    """Reap ``child``, which is expected to exit by itself now (terminated if the run stops
    first); its raw wait status."""
    if child.status is not None:
        status: int = child.status
        return status
    status = child.wait()
    _log_exit(child, status)
    return status


def kill(child: Any, grace: float = GRACE) -> int:
    """SIGTERM ``child``, SIGKILL it after ``grace`` seconds, reap it. Idempotent."""
    if child.status is not None:
        status: int = child.status
        return status
    status = child.kill(grace)
    _log_exit(child, status)
    return status


def died_error(child: Any) -> WorkerError:
    """The error of an item whose child ended without finishing it."""
    status = child.status
    how = describe(status) if status is not None else "an unknown status"
    if status is not None and os.WIFSIGNALED(status):
        what = f"was killed by {how}"
    else:
        what = f"exited with {how}"
    return WorkerError(
        f"stage {child.stage!r}: child process {child.pid} {what} before it finished its "
        "item (no result was sent back)"
    )


def child_exception(stage: str, pid: int, payload: tuple[Any, ...]) -> BaseException:
    """The exception child ``pid`` reported (``worker_loop.error_payload``), as itself when
    it unpickles, else as a WorkerError; the child's traceback attached either way."""
    return worker_exception(stage, f"forked child process {pid}", payload)


def pump(child: Any, take: Callable[[list[tuple[Any, Any]]], None]) -> tuple[str, Any]:
    """Read the child's frames, handing their entries to ``take``, until it reports the
    work done (``("done" | "retired", None)``), failed (``("error" | "fatal",
    exception)``) or the pipe ends without either (``("eof", None)``). Raises RunStopping
    when the run stops first."""
    exception = functools.partial(child_exception, child.stage, child.pid)
    return read_reply(iter(child.read_frame, None), take, exception)


def count_items(item: Any) -> int:
    return len(item) if isinstance(item, (list, tuple)) else 1
