"""What user code calls from inside a running stage: ``mg.emit`` and ``mg.trigger``.

``emit`` goes straight to the Rust emitter bound to the current worker thread. A forked
child or a subinterpreter worker has no runtime; there the process-local override set by
the worker (``set_child_emitter``) carries values back to the parent instead.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .errors import MinigunError, RoutingError
from .native import ext


class Run(Protocol):
    """What this module needs of a run (``minigun.run.Run``, a layer above this one)."""

    @property
    def run_id(self) -> int: ...
    def has_stage(self, name: str) -> bool: ...
    def trigger(self, name: str) -> None: ...
    def cancel(self) -> None: ...
    def stop_for_exit(self, grace: float) -> None: ...
    def detach_runtime(self, stand_in: Any) -> Any: ...


_native_emit = ext.emit
_current_run_id = ext.current_run_id
_child_emit: Callable[[Any, str | None], None] | None = None
#: An async stage's attempt in progress: its emits wait here until its outcome is known
#: (one list per asyncio task).
_held: contextvars.ContextVar[list[tuple[Any, str | None]] | None] = contextvars.ContextVar(
    "minigun_held_emits", default=None
)

_runs_lock = threading.Lock()
_active_runs: list[Run] = []


def emit(value: Any, to: str | None = None) -> None:
    """Send ``value`` to the current stage's downstream stages, or only to the one named
    ``to`` (which must be one of them)."""
    if _child_emit is not None:
        _child_emit(value, to)
        return
    held = _held.get()
    if held is not None:
        held.append((value, to))
        return
    try:
        _native_emit(value, to)
    except RuntimeError as exc:
        if "outside a running stage" in str(exc):
            raise MinigunError(str(exc)) from None
        raise


def hold_emits() -> list[tuple[Any, str | None]]:
    """Hold back what this task emits from now on (an item's attempt, until its outcome
    is known)."""
    held: list[tuple[Any, str | None]] = []
    _held.set(held)
    return held


def release_emits(held: list[tuple[Any, str | None]] | None, keep: bool) -> None:
    """End a held attempt: emit what it held if it succeeded (``keep``), else drop it."""
    if held is None:
        return
    _held.set(None)
    if keep:
        for value, to in held:
            emit(value, to)


def merge_tick() -> None:
    """A Python no-op the runtime's worker threads call now and then on free-threaded
    builds: running any bytecode lets a thread merge the reference counts other threads
    handed back to it (see src/worker.rs, python_thread)."""


def set_child_emitter(fn: Callable[[Any, str | None], None] | None) -> None:
    """In a worker process: route ``emit`` through ``fn`` (``None`` restores the default)."""
    global _child_emit
    _child_emit = fn


def runs_after_fork() -> list[Run]:
    """In a forked child: the runs it inherited from its parent. The registry gets a fresh
    lock first: the parent's may have been held by another of its threads at the fork."""
    global _runs_lock
    _runs_lock = threading.Lock()
    return list(_active_runs)


def register_run(run: Run) -> None:
    with _runs_lock:
        _active_runs.append(run)


def unregister_run(run: Run) -> None:
    with _runs_lock:
        if run in _active_runs:
            _active_runs.remove(run)


#: The run whose hooks this thread is running (hooks run outside any stage worker).
_hook_thread = threading.local()


@contextlib.contextmanager
def running_hooks_of(run: Run) -> Iterator[None]:
    """Mark this thread as running ``run``'s hooks, so ``mg.trigger`` in them reaches it."""
    outer = getattr(_hook_thread, "run", None)
    _hook_thread.run = run
    try:
        yield
    finally:
        _hook_thread.run = outer


def _callers_run(runs: list[Run]) -> Run | None:
    """The run the calling code belongs to: the run of the stage worker on this thread,
    or of the hooks it is running."""
    run_id = _current_run_id()
    if run_id is not None:
        for run in runs:
            if run.run_id == run_id:
                return run
    return getattr(_hook_thread, "run", None)


def trigger(name: str) -> None:
    """Start the ``auto_start=False`` producer called ``name`` in the running pipeline:
    the caller's own run when called from a stage or hook, else the newest run that has
    a stage of that name."""
    with _runs_lock:
        runs = list(_active_runs)
    own = _callers_run(runs)
    if own is not None:
        own.trigger(name)
        return
    for run in reversed(runs):
        if run.has_stage(name):
            run.trigger(name)
            return
    if not runs:
        raise RoutingError(f"trigger({name!r}) was called while no pipeline is running")
    raise RoutingError(f"trigger({name!r}): no stage named {name!r} in the running pipeline")


#: How long interpreter exit waits for background runs to stop after cancelling them.
EXIT_GRACE = 5.0


@atexit.register
def _stop_background_runs() -> None:
    """At interpreter exit, cancel runs still going in the background and wait for their
    workers, which must not outlive the interpreter (they would take the GIL from a
    finalizing interpreter)."""
    with _runs_lock:
        runs = list(_active_runs)
    for run in runs:
        run.cancel()
    for run in runs:
        run.stop_for_exit(EXIT_GRACE)
