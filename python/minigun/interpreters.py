"""The subinterpreter executors: ``interpreters`` (N long-lived subinterpreters per stage,
one per Rust worker thread, started at its first chunk) and ``spawn_interpreter`` (a new
subinterpreter per input item, at most ``max_interpreters`` alive per pipeline scope).

A subinterpreter has its own GIL (CPython 3.13+), so pure-Python stages run in parallel
in one process. It shares no objects with the parent: the stage's code goes in once,
pickled (:mod:`minigun.worker_job`); items go in a chunk at a time, and what they
emit comes back with each item's outcome, over pipes, in the frames a fork_ipc child
uses. The far side is the pure-Python worker loop (:mod:`minigun.interpreter_worker`
over :mod:`minigun.worker_loop`), so the item contract is the one every process
boundary keeps: retries that discard a failed attempt's emits, per-item ``on_error``
with the item, ``open``/``close`` per worker, ``emit(to=)`` checked.

A subinterpreter cannot be killed. To stop, the parent sets the worker's stop flag (it
leaves the rest of its chunk before the next item), closes its message pipe (it
closes the stage's worker and returns), drains what it still sends, and joins its thread;
then the subinterpreter is destroyed. So an item in progress runs to its end, as on a
thread, and nothing is left running once the run's workers are closed.

An ``interpreters`` worker that closed cleanly leaves its subinterpreter idle, kept by the
process for the next ``interpreters`` worker of any run (:class:`_IdleInterpreters`):
CPython 3.13 does not give a destroyed subinterpreter's memory back, and a new one pays
for importing minigun and the stage's module again.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import mmap
import os
import pickle
import select
import sys
import threading
from collections.abc import Callable
from typing import Any

from . import worker_loop as loop
from .budget import INTERPRETERS, BudgetPlan, Outcome, Slots
from .errors import WorkerError
from .graph import Node
from .interpreter_worker import BOOT, STOP_FLAG_SIZE
from .native import ext
from .plan import StagePlan
from .strategies import INTERPRETERS_MODULE
from .work import PerRun, Run, StageCode, Work
from .worker_job import job_of, pack_by_name
from .worker_reply import ChunkReply, chunk_message, read_reply, worker_exception

#: How often a parent waiting for a worker's frames checks whether the run is stopping.
_POLL = 0.05


@functools.cache
def _api() -> Any:
    """The subinterpreter module (``concurrent.interpreters``, or its backport on 3.13),
    imported at the first worker: it is an optional dependency and most runs never
    start a subinterpreter."""
    return importlib.import_module(INTERPRETERS_MODULE)


#: Tries at creating a subinterpreter. CPython 3.13 fails a creation now and then while
#: other subinterpreters are being created or are importing ("Failed to import encodings
#: module", then ``InterpreterError``; python/cpython#128381 and #131485): minigun creates
#: one at a time, and tries again after such a failure.
_CREATE_TRIES = 3
_create_lock = threading.Lock()


def _create() -> Any:
    """A new subinterpreter (``InterpreterError`` once every try failed)."""
    api = _api()
    for _ in range(_CREATE_TRIES - 1):
        with _create_lock, contextlib.suppress(api.InterpreterError):
            return api.create()
    with _create_lock:
        return api.create()


class _IdleInterpreters:
    """The subinterpreters whose ``interpreters`` worker closed cleanly, kept for the next
    such worker of any run, at most one per CPU the process may use; the rest, and all of
    them at exit, are destroyed.

    Why keep them: CPython 3.13 does not give a destroyed subinterpreter's memory back
    (about 1.8 MB, 4 MB more once it imported minigun and a stage module; CPython issues
    110411 and 113055), so a process that ran an ``interpreters`` stage per request grew
    by that much per worker per run, and every run paid again for starting its workers.
    A kept one has minigun and the stage modules imported, and runs no code while idle.
    ``spawn_interpreter`` promises a new subinterpreter per item and never takes one.

    They are destroyed before any fork of the process (minigun's fork strategies, or the
    user's ``os.fork``): CPython crashes a child forked while the process has
    subinterpreters (CPython issue 101437). A child forgets any given back meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._keep = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        atexit.register(self.close_all)
        os.register_at_fork(before=self.close_all, after_in_child=self._forget)

    def take(self) -> Any | None:
        """An idle subinterpreter, if one is kept."""
        with self._lock:
            return self._idle.pop() if self._idle else None

    def give(self, interpreter: Any) -> None:
        """Keep ``interpreter`` for the next worker, or destroy it when enough are kept."""
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(interpreter)
                return
        interpreter.close()

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for interpreter in idle:
            interpreter.close()

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._idle = []


_idle = _IdleInterpreters()


def _main_module() -> tuple[str, str]:
    """The parent's ``__main__`` as a worker can import it: its file, or its module name
    under ``python -m`` ("" where there is neither)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return "", spec.name
    return getattr(main, "__file__", None) or "", ""


class _FrameReader:
    """Reads the length-prefixed frames a worker writes (worker_loop.pipe_sender)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def next(self, stopping: Callable[[], bool]) -> bytes | None:
        """The next frame; None at end of stream. Raises RunStopping once ``stopping()``
        (asked every ``_POLL`` seconds while nothing arrives)."""
        size = loop.HEADER.size
        while True:
            if len(self.buffer) >= size:
                length = loop.HEADER.unpack_from(self.buffer)[0]
                if len(self.buffer) >= size + length:
                    frame = bytes(self.buffer[size : size + length])
                    del self.buffer[: size + length]
                    return frame
                wanted = size + length - len(self.buffer)
            else:
                wanted = size
            if not select.select([self.fd], [], [], _POLL)[0]:
                if stopping():
                    raise ext.RunStopping("the run is stopping")
                continue
            data = os.read(self.fd, max(wanted, 1 << 16))
            if not data:
                return None
            self.buffer += data


def _never() -> bool:
    return False


def _pipe(undo: contextlib.ExitStack) -> tuple[int, int]:
    """A pipe whose ends ``undo`` closes if what is being built fails."""
    read_fd, write_fd = os.pipe()
    undo.callback(os.close, write_fd)
    undo.callback(os.close, read_fd)
    return read_fd, write_fd


class _Interpreter:
    """One subinterpreter serving a stage's job on a thread of its own, over two pipes
    (messages in, frames out), with a stop flag it reads before each item: one byte of a
    memfd both sides map, so the check costs a memory read, not a system call."""

    def __init__(self, job: bytes, stage: str, reuse: bool) -> None:
        self.stage = stage
        #: Whether the subinterpreter may be an idle one, and kept idle once it is done.
        self.reuse = reuse
        #: Why the worker's code ended early (it raised past the worker loop), if it did.
        self.failure: BaseException | None = None
        # What is made here is released here if a later step fails, by finish() once the
        # worker's thread runs.
        with contextlib.ExitStack() as undo:
            self.interpreter = (reuse and _idle.take()) or _create()
            undo.callback(self.interpreter.close)
            self.id: int = self.interpreter.id
            receive_fd, self._message_fd = _pipe(undo)
            frame_fd, send_fd = _pipe(undo)
            stop_fd = os.memfd_create("minigun-stop-flag", os.MFD_CLOEXEC)
            undo.callback(os.close, stop_fd)
            os.ftruncate(stop_fd, STOP_FLAG_SIZE)
            self._stop_flag = mmap.mmap(stop_fd, STOP_FLAG_SIZE)
            undo.callback(self._stop_flag.close)
            self._worker_fds = (receive_fd, send_fd, stop_fd)
            self.frames = _FrameReader(frame_fd)
            self.interpreter.prepare_main(
                _minigun_sys_path=tuple(sys.path),
                _minigun_job=job,
                _minigun_stage=stage,
                _minigun_fds=self._worker_fds,
                _minigun_main=_main_module(),
            )
            self._thread = threading.Thread(
                target=self._serve, name=f"minigun-interpreter-{self.id}", daemon=True
            )
            self._thread.start()
            undo.pop_all()

    def _serve(self) -> None:
        try:
            self.interpreter.exec(BOOT)
        except BaseException as exc:  # noqa: BLE001 - reported by the parent's reader
            self.failure = exc
        finally:
            # The worker's ends close when it is done: the parent reads end of stream.
            for fd in self._worker_fds:
                os.close(fd)

    def send(self, message: bytes) -> bool:
        """Write one message; False if the worker is gone."""
        try:
            loop.pipe_sender(self._message_fd)(message)
        except (BrokenPipeError, OSError):
            return False
        return True

    def ended_error(self) -> WorkerError:
        cause = self.failure
        why = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        error = WorkerError(
            f"stage {self.stage!r}: subinterpreter {self.id} stopped answering{why}"
        )
        error.__cause__ = cause
        return error

    def stop(self) -> None:
        """Ask the worker to leave the rest of its chunk (before its next item)."""
        self._stop_flag[0] = 1

    def finish(self, abandon: bool = False, closed: bool = False) -> None:
        """End the worker (``abandon``: stop it first, mid-chunk) and, once its thread is
        done, destroy the subinterpreter, or keep it idle when the worker ``closed``
        cleanly (never abandoned, then) and ended without an error."""
        if abandon:
            self.stop()
        os.close(self._message_fd)  # the worker's next read ends: it closes and returns
        while self.frames.next(_never) is not None:
            pass  # what it still sends, so a full pipe never blocks it
        self._thread.join()
        os.close(self.frames.fd)
        self._stop_flag.close()
        if self.reuse and closed and self.failure is None:
            _idle.give(self.interpreter)
        else:
            self.interpreter.close()


class _InterpreterWorker:
    """One Rust worker thread's subinterpreter, started at its first chunk (also the
    worker of one item under spawn_interpreter, which never ``reuse``s one)."""

    def __init__(self, run: Run, path: str, job: bytes, reuse: bool) -> None:
        self.run = run
        self.path = path
        self.job = job
        self.reuse = reuse
        self.interpreter: _Interpreter | None = None

    def _stopping(self) -> bool:
        return self.run.stopping

    def _where(self) -> str:
        return f"subinterpreter {self.interpreter.id if self.interpreter else '?'}"

    def _exchange(
        self, interpreter: _Interpreter, message: bytes, reply: ChunkReply
    ) -> tuple[str, BaseException | None]:
        """Send one message and read the reply to its end: ``(tag, error)``, the tag
        "eof" when the worker ended without finishing it."""
        if not interpreter.send(message):
            return "eof", interpreter.ended_error()
        frames = iter(functools.partial(interpreter.frames.next, self._stopping), None)
        tag, error = read_reply(frames, reply.take, self._exception)
        return (tag, interpreter.ended_error()) if tag == "eof" else (tag, error)

    def _exception(self, payload: tuple[Any, ...]) -> BaseException:
        return worker_exception(self.path, self._where(), payload)

    def call(self, items: list[Any]) -> Outcome:
        """Run one chunk in the subinterpreter: ``(retries, [(item, exception), ...])``
        for the runtime (None when nothing failed or was retried)."""
        message, items, failures = chunk_message(
            self.path, items, False, "a subinterpreter worker", "or use strategy='threads'"
        )
        if message is None:
            return 0, failures
        if self.interpreter is None:
            if self.run.stopping:
                raise ext.RunStopping(f"stage {self.path!r}: the run is stopping")
            self.interpreter = _Interpreter(self.job, self.path, self.reuse)
        interpreter = self.interpreter
        reply = ChunkReply(self.path, self._where, items, ext.emit)
        try:
            outcome, error = self._exchange(interpreter, message, reply)
        except BaseException:
            # Stopping, or a value was refused downstream: the worker may be mid-chunk.
            interpreter.stop()
            raise
        failures += reply.failures
        if outcome == "eof":
            assert error is not None
            failures += [(item, error) for item in items[reply.finished :]]
            self._drop()
        elif outcome == loop.RETIRED:
            self._drop()
        elif outcome == loop.FATAL:
            self._drop(abandon=True)
            assert error is not None
            raise error
        return (reply.retries, failures) if reply.retries or failures else None

    def _drop(self, abandon: bool = False, closed: bool = False) -> None:
        interpreter, self.interpreter = self.interpreter, None
        if interpreter is not None:
            interpreter.finish(abandon, closed)

    def close(self) -> None:
        """Close the stage's worker in the subinterpreter (what its close() emits goes
        downstream) and destroy the subinterpreter, or keep it idle for the next worker;
        when the run is stopping, abandon it."""
        interpreter = self.interpreter
        if interpreter is None:
            return
        if self.run.stopping:
            self._drop(abandon=True)
            return
        reply = ChunkReply(self.path, self._where, [], ext.emit)
        try:
            outcome, error = self._exchange(
                interpreter, pickle.dumps((loop.CLOSE, None), loop.PROTOCOL), reply
            )
        except BaseException:
            self._drop(abandon=True)
            raise
        self._drop(closed=error is None)
        if error is not None:
            raise error
        reply.deliver()  # what close() emitted


class _RunInterpreters:
    """A run's subinterpreter budget: planned once, then kept while it runs."""

    def __init__(self, run: Run) -> None:
        self.plan = BudgetPlan(run.graph, run.plans, INTERPRETERS)
        self.slots = Slots(self.plan)


_runs: PerRun[_RunInterpreters] = PerRun(_RunInterpreters)


def _job(run: Run, node: Node, plan: StagePlan) -> bytes:
    """The stage's code as a subinterpreter gets it (DefinitionError if it cannot)."""
    return pack_by_name(job_of(node, plan, run.graph.route_error(node)))


def interpreters_executor(run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work:
    """``interpreters``: a long-lived subinterpreter per worker thread. ``code`` (the
    in-process closures) is not used: the worker rebuilds the stage from its job."""
    job = _job(run, node, plan)
    workers = _runs.of(run).plan.long_lived_workers.get(node.path, plan.workers)

    def make_worker() -> tuple[Callable[[list[Any]], Outcome], Callable[[], None]]:
        worker = _InterpreterWorker(run, node.path, job, reuse=True)
        return worker.call, worker.close

    return Work(call=None, mode="chunk", make_worker=make_worker, threads=workers)


def spawn_interpreter_executor(run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work:
    """``spawn_interpreter``: each item gets a new subinterpreter (its worker: opened,
    given the item, closed), at most ``max_interpreters`` alive per pipeline scope."""
    job = _job(run, node, plan)
    state = _runs.of(run)
    scopes = [id(s) for s in node.scope.lineage()]
    threads = max(1, min(plan.workers, state.plan.most_workers(scopes)))
    path = node.path

    def stopping() -> bool:
        return run.stopping

    def stopped() -> BaseException:
        return ext.RunStopping(f"stage {path!r}: the run is stopping")

    def one(item: Any) -> Outcome:
        return _one_item(_InterpreterWorker(run, path, job, reuse=False), item)

    def call(items: list[Any]) -> Outcome:
        return state.slots.each(path, scopes, items, one, stopping, stopped)

    return Work(call=call, mode="chunk", make_worker=None, threads=threads)


def _one_item(worker: _InterpreterWorker, item: Any) -> Outcome:
    """One item's subinterpreter: open, the item (retries included), close. A failing
    close() fails the item, unless the item had failed already."""
    try:
        outcome = worker.call([item])
    except BaseException:
        worker.close()
        raise
    try:
        worker.close()
    except Exception as exc:  # noqa: BLE001 - reported as the item's failure
        retries, failures = outcome or (0, [])
        if not failures:
            failures = [(item, exc)]
        return retries, failures
    return outcome


__all__ = ["interpreters_executor", "spawn_interpreter_executor"]
