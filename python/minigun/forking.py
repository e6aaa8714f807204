"""The process strategies: ``spawn_fork`` (a forked child per item) and ``fork_ipc``
(long-lived forked workers).

``Run._spec`` hands every stage whose strategy forks to :func:`fork_call`, which returns
the call the Rust worker threads make instead of the stage function.

How a fork happens (fork safety)
--------------------------------
The runtime's Rust worker threads keep running while a stage forks, so the child starts
with copies of locks that other threads may have held at that instant: the channel and
outbox mutexes, the stats, the semaphores, PyO3's pending-decref pool. A child that
touched any of them could wait forever. minigun's rule is therefore:

    **the child is a pure-Python island: it never calls into the Rust extension and
    never returns into the Rust frames it was forked from; it leaves with os._exit().**

* The fork is ``os.fork()`` called from the stage's own worker thread while it is attached
  to the interpreter, so CPython's own fork protocol applies: the GIL (or, on free-threaded
  builds, a stop-the-world pause), the import lock and the runtime's internal locks are
  held across the fork and reset in the child; stdlib modules (``logging``, ``random``,
  ``threading``) re-initialise their state through ``os.register_at_fork``.
* In the child, ``mg.emit`` / ``self.emit`` go to a pure-Python writer
  (``context.set_child_emitter``) that pickles values into length-prefixed frames and
  ``os.write``s them to a pipe; a ``fork_ipc`` worker reads its items with ``os.readv``. No
  PyO3 function, method or object of the extension is called or freed in the child.
* Every ``Run`` the child inherited has its runtime replaced by a stub that raises a clear
  :class:`~minigun.errors.MinigunError` (``mg.trigger`` from a child, for example), so a
  child cannot even reach the parent's runtime by mistake (the Rust ``Runtime`` would refuse
  another pid as well, but only after taking PyO3 locks).
* The fork happens with the Rust fork gate closed (``ext.fork_gate_close``): no
  minigun thread is creating or deleting its Python thread state at that instant, which
  would leave the child deadlocked in ``PyOS_AfterFork_Child`` on CPython 3.11/3.12.
* The child never touches the std streams it inherited (another thread may have held
  their locks at the fork): it gets fresh ``sys.stdout``/``sys.stderr`` over fds 1 and 2.
* What the child runs (the item contract: stage forms, retries, per-item outcomes) is
  :mod:`minigun.worker_loop`, pure Python; this module is the fork and the parent side.
* Pipes are created and forks happen under one lock, and each child closes the parent's
  ends of every other child's pipes, so a pipe's end of stream is seen as soon as its child
  exits (a sibling never keeps it open).
* ``spawn_fork`` cannot use a fork server: its point is that the child reads the item (a
  batch built moments ago) through copy-on-write memory, so it must fork the process that
  holds the item. ``fork_ipc`` uses the same mechanism for one code path.
* The "multi-threaded fork" DeprecationWarning of Python 3.12+ is filtered for forks made
  by this module only (the filter matches this module's name).

Children ignore SIGINT (a Ctrl-C reaches the whole process group; the parent coordinates
the shutdown) and take SIGTERM's default action. While the parent waits for a child it
checks every 50 ms whether the run is stopping; if so it terminates the child (SIGTERM,
then SIGKILL after a grace period) and reaps it. ``Run._finish`` calls :func:`reap_run`
after the runtime's threads are joined, which ends idle ``fork_ipc`` children left by a
cancelled or failed run (and an ``atexit`` hook ends children of runs never finished).
Every child is reaped exactly once: reaping happens under the child's own lock.

Budget: ``max_processes`` bounds the children alive at once per pipeline scope (a nested
pipeline's children count in every enclosing scope too). Every fork stage holds a standing
reservation: a ``fork_ipc`` stage one process per worker, a ``spawn_fork`` stage one
process (the child it is always guaranteed). ``fork_ipc`` process counts are lowered, with
a warning, where a scope's fork stages need more than its limit together (each keeps one).
What the limit leaves over is shared by the ``spawn_fork`` stages for their second and
later concurrent children. So a scope never has more than ``max(max_processes, number of
fork stages)`` children alive, and no stage ever waits for another stage's process, which
could deadlock a pipeline whose long-lived workers wait for input from a starved stage.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import pickle
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

try:
    import fcntl

    _F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)
except ImportError:  # pragma: no cover - no fork there either
    _F_SETPIPE_SZ = None

from . import context
from . import hooks as _hooks
from . import worker_loop as loop
from .config import RetryPolicy
from .errors import MinigunError, WorkerError
from .fork_budget import RunForks
from .native import ext
from .worker_reply import ChunkReply, worker_exception

logger = logging.getLogger("minigun")

#: Seconds a child gets to exit after SIGTERM before SIGKILL.
GRACE = 1.0
#: How often a waiting parent looks at the run's stop flag (the Rust side ticks at 50 ms).
_POLL = 0.05
_CHILD_EXIT_OK, _CHILD_EXIT_BROKEN = 0, 70


class _Stopping(MinigunError):
    """The run is stopping: the worker gives up on its item (the runtime ignores this)."""


# -- fork machinery shared by both strategies ---------------------------------------------

_fork_lock = threading.Lock()
#: The parent's ends of every live child's pipes: a new child closes them all.
_parent_fds: set[int] = set()
_warning_filter: Any = None


def _quiet_fork_warning() -> None:
    """Filter 3.12+'s "multi-threaded, use of fork() may lead to deadlocks" warning for
    forks called from this module only (the warning is attributed to the caller of
    os.fork). Re-installed when something (pytest, catch_warnings) reset the filters."""
    global _warning_filter
    if _warning_filter is not None and _warning_filter in warnings.filters:
        return
    warnings.filterwarnings(
        "ignore",
        message=r".*use of fork\(\) may lead to deadlocks",
        category=DeprecationWarning,
        module=r"minigun\.forking\Z",
    )
    _warning_filter = warnings.filters[0]


#: In a child: the std streams it inherited, kept alive and untouched until os._exit.
_inherited_streams: list[Any] = []


def _fresh_std_streams() -> None:
    """In a child: give it its own ``sys.stdout`` and ``sys.stderr`` over fds 1 and 2.

    The inherited stream objects may be locked forever: another parent thread may have
    been inside a write or flush (holding the buffer's lock) at the instant of the fork.
    The child never touches them, so it cannot block on them (and never writes out what
    the parent had buffered, which the parent writes itself). Streams the user replaced
    (anything but ``sys.__stdout__`` / ``sys.__stderr__``) are left alone."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        inherited = getattr(sys, name)
        original = getattr(sys, f"__{name}__")
        if inherited is None or inherited is not original:
            continue
        try:
            raw = io.FileIO(fd, "w", closefd=False)
            stream = io.TextIOWrapper(
                io.BufferedWriter(raw),
                encoding=original.encoding,
                errors=original.errors,
                line_buffering=original.line_buffering,
            )
        except Exception:  # noqa: BLE001 - no such fd: keep what there is
            continue
        _inherited_streams.append(inherited)  # never finalized: that would flush it
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _flush_child_streams() -> None:
    """Flush the child's stdout and stderr (its own, see :func:`_fresh_std_streams`)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - a broken stdout must not break a child
            pass


def _describe(status: int) -> str:
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


class _Child:
    """A forked child as the parent sees it. Only the thread that owns it reaps it."""

    def __init__(self, pid: int, rfd: int, wfd: int | None, stage: str, forks: RunForks):
        self.pid = pid
        self.rfd = rfd
        self.wfd = wfd
        self.stage = stage
        self.forks = forks
        self.started = time.perf_counter()
        self.status: int | None = None
        self.items = 0
        self._lock = threading.Lock()

    def wait(self, stopping: Callable[[], bool]) -> int:
        """Reap the child, which is expected to exit by itself now; terminate it if the run
        stops first."""
        while self.status is None:
            if stopping():
                return self.kill()
            with self._lock:
                if self.status is None:
                    status = ext.reap(self.pid, _POLL)
                    if status is not None:
                        self._ended(status)
        return self.status

    def kill(self, grace: float = GRACE) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; reap. Idempotent."""
        with self._lock:
            if self.status is None:
                self._ended(ext.terminate(self.pid, grace))
        assert self.status is not None
        return self.status

    def _ended(self, status: int) -> None:
        self.status = status
        self.forks.forget(self)
        with _fork_lock:
            for fd in (self.rfd, self.wfd):
                if fd is not None and fd in _parent_fds:
                    _parent_fds.discard(fd)
                    os.close(fd)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "exit: child pid %d of stage %r ended with %s after %.3fs (%d item(s))",
                self.pid,
                self.stage,
                _describe(status),
                time.perf_counter() - self.started,
                self.items,
            )

    def died_error(self) -> WorkerError:
        """The error of an item whose child ended without finishing it."""
        status = self.status
        how = _describe(status) if status is not None else "an unknown status"
        if status is not None and os.WIFSIGNALED(status):
            what = f"was killed by {how}"
        else:
            what = f"exited with {how}"
        return WorkerError(
            f"stage {self.stage!r}: child process {self.pid} {what} before it finished its "
            "item (no result was sent back)"
        )


def _spawn(
    forks: RunForks,
    stage: str,
    n_items: int,
    before: list[Callable[[], Any]],
    child_main: Callable[..., int],
    args: tuple[Any, ...],
    duplex: bool,
) -> _Child:
    """Run the before_fork hooks and fork a child that runs ``child_main(wfd, [rfd,] *args)``
    and exits. Returns the parent's view of the child."""
    for hook in before:
        hook()
    _quiet_fork_warning()
    blocked = {signal.SIGINT, signal.SIGTERM}
    with _fork_lock:
        r, w = os.pipe()  # child -> parent
        fds = [r, w]
        if duplex:
            cr, cw = os.pipe()  # parent -> child
            fds += [cr, cw]
        try:
            _grow_pipe(w)
            # Signals stay blocked across the fork so the child cannot take a Ctrl-C before
            # it has set SIGINT to "ignore"; this thread gets its mask back right after.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
            # No minigun thread creates or deletes its thread state during the fork.
            ext.fork_gate_close()
            try:
                pid = os.fork()
                if pid == 0:
                    own = (w, cr) if duplex else (w,)
                    _child_entry(own, mask, child_main, args)  # never returns
            finally:
                ext.fork_gate_open()
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(w)
        wfd = None
        if duplex:
            os.close(cr)
            wfd = cw
            _parent_fds.add(cw)
        _parent_fds.add(r)
        child = _Child(pid, r, wfd, stage, forks)
        forks.remember(child)
    if logger.isEnabledFor(logging.DEBUG):
        if duplex:
            logger.debug("fork: stage %r started fork_ipc worker pid %d", stage, pid)
        else:
            logger.debug("fork: stage %r started child pid %d for %d item(s)", stage, pid, n_items)
    return child


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer (fewer wake-ups for large results); fine if refused."""
    if _F_SETPIPE_SZ is not None:
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass


# -- the child side: pure Python, never the extension ------------------------------------


def _child_entry(
    own: tuple[int, ...], mask: Any, child_main: Callable[..., int], args: tuple[Any, ...]
) -> None:
    code = _CHILD_EXIT_BROKEN
    try:
        try:
            _child_setup(own, mask)
            code = child_main(*own, *args)
        except BaseException:  # noqa: BLE001 - nothing may escape a child
            code = _CHILD_EXIT_BROKEN
        _flush_child_streams()
    finally:
        os._exit(code)


def _child_setup(own: tuple[int, ...], mask: Any) -> None:
    global _fork_lock, _parent_fds, _runs
    _fresh_std_streams()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for fd in _parent_fds:
        if fd not in own:
            try:
                os.close(fd)
            except OSError:
                pass
    # Fresh module state: the parent's lock was held across the fork, and the parent's
    # children and runs are not this process's to manage.
    _fork_lock = threading.Lock()
    _parent_fds = set()
    _runs = weakref.WeakKeyDictionary()
    _detach_runs()


class _ParentRuntime:
    """Stands in for the Rust runtime of a run inherited by a forked child."""

    def __init__(self, pid: int) -> None:
        self._pid = pid

    def __getattr__(self, name: str) -> Any:
        raise MinigunError(
            f"this pipeline run belongs to the parent process (pid {self._pid}); a forked "
            f"child cannot use it (tried Runtime.{name}): no trigger, cancel, wait or stats "
            "from inside a spawn_fork/fork_ipc stage"
        )


def _detach_runs() -> None:
    parent = os.getppid()
    context._runs_lock = threading.Lock()
    for run in list(context._active_runs):
        try:
            run._runtime = _ParentRuntime(parent)
        except Exception:  # noqa: BLE001
            pass


def _spawn_child(wfd: int, fn: _Node, start: loop.Start, item: Any) -> int:
    """A spawn_fork child: the worker for one item (see worker_loop.run_one)."""
    out = loop.Outbox(
        loop.pipe_sender(wfd),
        fn.path,
        fn.routes,
        fn.route_error,
        deliver=fn.send_back,
        streaming=True,
        before_reply=_flush_child_streams,
    )
    context.set_child_emitter(out.emit)
    loop.run_one(_with_hooks(fn.after, start), fn.mode, item, out)
    return _CHILD_EXIT_OK


def _ipc_child(wfd: int, rfd: int, fn: _Node, start: loop.Start, policy: RetryPolicy) -> int:
    """A fork_ipc worker: answers chunks until the parent closes it (worker_loop.serve)."""
    out = loop.Outbox(
        loop.pipe_sender(wfd), fn.path, fn.routes, fn.route_error, before_reply=_flush_child_streams
    )
    context.set_child_emitter(out.emit)
    loop.serve(loop.pipe_receiver(rfd), out, _with_hooks(fn.after, start), fn.mode, policy)
    return _CHILD_EXIT_OK


def _with_hooks(after: list[Callable[[], Any]], start: loop.Start) -> loop.Start:
    """The child's worker start: the after_fork hooks, then the worker's own start."""

    def start_after_fork() -> tuple[loop.Call, Callable[[], Any] | None]:
        for hook in after:
            hook()
        return start()

    return start_after_fork


# -- the parent side ----------------------------------------------------------------------


def _child_exception(stage: str, pid: int, payload: tuple[Any, ...]) -> BaseException:
    return worker_exception(stage, f"forked child process {pid}", payload)


def _pump(
    child: _Child, tick: Callable[[], None], take: Callable[[list[tuple[Any, Any]]], None]
) -> tuple[str, Any]:
    """Read the child's frames, handing their entries to ``take``, until it reports the
    work done (``("done" | "retired", None)``), failed (``("error" | "fatal",
    exception)``) or the pipe ends without either (``("eof", None)``)."""
    while True:
        frame = ext.read_frame(child.rfd, tick, child.pid)
        if frame is None:
            return "eof", None
        tag, data = pickle.loads(frame)
        del frame
        if tag in (loop.VALUES, loop.DONE, loop.RETIRED):
            take(data)
            del data
            if tag != loop.VALUES:
                return tag, None
        else:
            return tag, _child_exception(child.stage, child.pid, data)


class _Node:
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
        self.forks = _run_forks(run)

    def stopping(self) -> bool:
        return self.run.stopping

    def tick(self) -> None:
        if self.stopping():
            raise _Stopping(f"stage {self.path!r}: the run is stopping")


def _count(item: Any) -> int:
    return len(item) if isinstance(item, (list, tuple)) else 1


def _function_worker(call: loop.Call) -> loop.Start:
    """The worker start of a function stage: nothing to open or close."""

    def start() -> tuple[loop.Call, None]:
        return call, None

    return start


# spawn_fork -------------------------------------------------------------------------------


def _spawn_fork_call(fn: _Node, start: loop.Start) -> Callable[[Any], None]:
    """The call a spawn_fork stage's worker thread makes per item: fork a child that is
    the stage's worker for that one item, forward what it emits, raise what it raised."""
    emit = ext.emit

    def forward(entries: list[tuple[Any, Any]]) -> None:
        for to, value in entries:
            emit(value, to)

    def spawn_fork(item: Any) -> None:
        fn.forks.acquire(fn)
        try:
            child = _spawn(
                fn.forks,
                fn.path,
                _count(item),
                fn.before,
                _spawn_child,
                (fn, start, item),
                duplex=False,
            )
            child.items = _count(item)
            try:
                outcome, error = _pump(child, fn.tick, forward)
                child.wait(fn.stopping)
            except BaseException:
                child.kill()
                raise
        finally:
            fn.forks.release(fn)
        if outcome == "eof":
            raise child.died_error()
        if error is not None:
            raise error

    spawn_fork.__qualname__ = f"spawn_fork[{fn.path}]"
    return spawn_fork


# fork_ipc ---------------------------------------------------------------------------------


class _IpcWorker:
    """One Rust worker thread's long-lived child, forked at its first item."""

    def __init__(self, fn: _Node, start: loop.Start, policy: RetryPolicy):
        self.fn = fn
        self.start = start
        self.policy = policy
        self.child: _Child | None = None

    def _start(self) -> _Child:
        self.fn.tick()
        child = _spawn(
            self.fn.forks,
            self.fn.path,
            0,
            self.fn.before,
            _ipc_child,
            (self.fn, self.start, self.policy),
            duplex=True,
        )
        self.child = child
        return child

    def _reply(self, items: list[Any]) -> ChunkReply:
        def where() -> str:
            return f"forked child process {self.child.pid if self.child else 0}"

        return ChunkReply(self.fn.path, where, items, ext.emit)

    def _drop(self, kill: bool) -> None:
        child, self.child = self.child, None
        if child is not None:
            child.kill() if kill else child.wait(self.fn.stopping)

    def _exchange(
        self, message: bytes, take: Callable[[list[tuple[Any, Any]]], None]
    ) -> tuple[str, Any]:
        """Send one message and collect the reply. A worker found dead before it could
        read the message (killed while idle) is replaced once, transparently."""
        for attempt in (1, 2):
            child = self.child
            if child is not None and ext.exited(child.pid):
                self._drop(kill=True)  # died while idle: reap it, fork a fresh one
                child = None
            child = child or self._start()
            delivered = True
            try:
                try:
                    ext.write_frame(child.wfd, message, self.fn.tick)
                except BrokenPipeError:
                    delivered = False  # gone; its last frames (if any) say why
                outcome, error = _pump(child, self.fn.tick, take)
            except BaseException:
                # Stopping, or a value was refused downstream: the child may be mid-item.
                self._drop(kill=True)
                raise
            if outcome == "eof":
                self._drop(kill=True)
                if not delivered and attempt == 1:
                    continue
                return "error", child.died_error()
            if outcome in (loop.FATAL, loop.RETIRED):
                self._drop(kill=False)
            return outcome, error
        raise AssertionError("unreachable")

    def call(self, items: list) -> tuple[int, list] | None:
        """Run one chunk in the child: ``(retries, [(item, exception), ...])`` for the
        runtime (None when nothing failed or was retried).

        The child reports each item's values with its outcome, and they are delivered
        when the outcome arrives. If the child dies mid-chunk, the items it had not
        reported go again to a fresh child in careful mode (each item reported before the
        next starts): the item that kills that child fails with a WorkerError, the rest
        complete. What an unreported item emitted was never delivered, so nothing is
        delivered twice, but the code of those items may run twice, as for any retry."""
        retries = 0
        failures: list[tuple[Any, BaseException]] = []
        start = 0
        careful = False
        while start < len(items):
            try:
                message = pickle.dumps((loop.CHUNK, (items[start:], careful)), loop.PROTOCOL)
            except Exception:  # noqa: BLE001 - some item cannot be pickled: it alone fails
                items = items[:start] + self._picklable(items[start:], failures)
                continue
            reply = self._reply(items[start:])
            outcome, error = self._exchange(message, reply.take)
            retries += reply.retries
            failures += reply.failures
            if outcome in (loop.DONE, loop.RETIRED):
                start = len(items)
            elif outcome == loop.FATAL:
                raise error
            elif careful:
                # It died on the first item it had not reported: that item fails.
                failures.append((items[start + reply.finished], error))
                start += reply.finished + 1
                careful = False
            else:
                start += reply.finished
                careful = True
        if self.child is not None:
            self.child.items += len(items)
        return (retries, failures) if retries or failures else None

    def _picklable(self, items: list[Any], failures: list[tuple[Any, BaseException]]) -> list[Any]:
        """The items that can be pickled to the worker; the others fail, one by one."""
        kept = []
        for item in items:
            try:
                pickle.dumps(item, loop.PROTOCOL)
            except Exception as exc:  # noqa: BLE001
                kind = type(item)
                error = WorkerError(
                    f"stage {self.fn.path!r}: an item of type {kind.__module__}."
                    f"{kind.__qualname__} cannot be pickled to send it to a fork_ipc "
                    f"worker process ({type(exc).__name__}: {exc}); send picklable items, "
                    "or use strategy='spawn_fork' (its children read items without "
                    "pickling) or 'threads'"
                )
                error.__cause__ = exc
                failures.append((item, error))
            else:
                kept.append(item)
        return kept

    def close(self) -> None:
        if self.child is None:
            return
        reply = self._reply([])
        outcome, error = self._exchange(pickle.dumps((loop.CLOSE, None), loop.PROTOCOL), reply.take)
        self._drop(kill=False)
        if error is not None:
            raise error
        reply.deliver()  # what close() emitted


def _ipc_factory(fn: _Node, start: loop.Start, policy: RetryPolicy) -> Callable[[], tuple]:
    def make_ipc_worker() -> tuple[Callable[[list], Any], Callable[[], None]]:
        worker = _IpcWorker(fn, start, policy)
        return worker.call, worker.close

    return make_ipc_worker


# -- the runs and their children ---------------------------------------------------------


_runs_lock = threading.Lock()
_runs: weakref.WeakKeyDictionary[Any, RunForks] = weakref.WeakKeyDictionary()


def _run_forks(run: Any) -> RunForks:
    with _runs_lock:
        forks = _runs.get(run)
        if forks is None:
            forks = _runs[run] = RunForks(run)
        return forks


def reap_run(run: Any) -> None:
    """End and reap every child ``run`` still has (idle fork_ipc workers of a cancelled or
    failed run). Called by the run once its worker threads are joined."""
    with _runs_lock:
        forks = _runs.pop(run, None)
    if forks is None:
        return
    for child in forks.live():
        child.kill()


@atexit.register
def _reap_all_at_exit() -> None:
    """Last resort when the interpreter exits while runs still have children (a run
    abandoned by a second Ctrl-C, or a background run never waited for): end them."""
    with _runs_lock:
        every = list(_runs.values())
    for forks in every:
        for child in forks.live():
            try:
                child.kill(grace=0.2)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass


# -- the entry point ----------------------------------------------------------------------


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
    forwards what the child emits, and raises what the child raised."""
    fn = _Node(run, node, mode)
    # The worker the child starts: a custom Stage's copy is made and opened in the child.
    start = make_worker if make_worker is not None else _function_worker(call)
    if strategy == "spawn_fork":
        # Each child is the stage's worker for one item: it opens, processes and closes
        # (a custom Stage), so what close() emits comes back too. The parent's worker
        # thread has nothing to open or close.
        workers = max(1, min(workers, fn.forks.most_children(fn)))
        return _spawn_fork_call(fn, start), "value", workers, None
    if strategy == "fork_ipc":
        workers = fn.forks.ipc_workers.get(node.path, workers)
        # Items travel in the runtime's chunks; the child retries, the runtime counts.
        return (
            None,
            "chunk",
            workers,
            _ipc_factory(fn, start, RetryPolicy(node.stage, node.scope.settings)),
        )
    raise ValueError(f"fork_call: {strategy!r} is not a fork strategy")
