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
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable
from typing import Any

try:
    import fcntl

    _F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)
except ImportError:  # pragma: no cover - no fork there either
    _F_SETPIPE_SZ = None

from . import _minigun, context
from . import hooks as _hooks
from .config import RetryPolicy
from .errors import MinigunError, WorkerError
from .strategies import plan

logger = logging.getLogger("minigun")

_HEADER = struct.Struct("<Q")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: Seconds a child gets to exit after SIGTERM before SIGKILL.
GRACE = 1.0
#: How often a waiting parent looks at the run's stop flag (the Rust side ticks at 50 ms).
_POLL = 0.05
#: A child sends what it emitted when this many values are buffered, or when the oldest
#: buffered value is this old (checked at each emit).
_FLUSH_VALUES = 256
_FLUSH_SECONDS = 0.05
#: Payloads up to this size are written with their header in one write.
_SMALL = 64 * 1024
#: Frame tags (each frame is a pickled ``(tag, data)``).
_VALUES, _DONE, _ERROR, _FATAL = "values", "done", "error", "fatal"
_CHUNK, _CLOSE = "chunk", "close"
#: Markers a fork_ipc child puts among its emitted ``(to, value)`` pairs as ``(kind, data)``
#: (an int ``kind`` never clashes with ``to``, a stage name or None): item ``data`` of the
#: chunk is finished; ``(k, error payload)``: item k failed after its retries; ``data``
#: retries happened.
_MARK_FINISHED, _MARK_FAILED, _MARK_RETRIED = 0, 1, 2
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
    warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks",
                            category=DeprecationWarning, module=r"minigun\.forking\Z")
    _warning_filter = warnings.filters[0]


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - a broken stdout must not break a fork
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

    def __init__(self, pid: int, rfd: int, wfd: int | None, stage: str, forks: _RunForks):
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
                    status = _minigun.reap(self.pid, _POLL)
                    if status is not None:
                        self._ended(status)
        return self.status

    def kill(self, grace: float = GRACE) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; reap. Idempotent."""
        with self._lock:
            if self.status is None:
                self._ended(_minigun.terminate(self.pid, grace))
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
            logger.debug("exit: child pid %d of stage %r ended with %s after %.3fs "
                         "(%d item(s))", self.pid, self.stage, _describe(status),
                         time.perf_counter() - self.started, self.items)

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


def _spawn(forks: _RunForks, stage: str, n_items: int, before: list[Callable[[], Any]],
           child_main: Callable[..., int], args: tuple[Any, ...], duplex: bool) -> _Child:
    """Run the before_fork hooks and fork a child that runs ``child_main(wfd, [rfd,] *args)``
    and exits. Returns the parent's view of the child."""
    for hook in before:
        hook()
    _flush_std_streams()
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
            try:
                pid = os.fork()
                if pid == 0:
                    own = (w, cr) if duplex else (w,)
                    _child_entry(own, mask, child_main, args)  # never returns
            finally:
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
            logger.debug("fork: stage %r started child pid %d for %d item(s)", stage, pid,
                         n_items)
    return child


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer (fewer wake-ups for large results); fine if refused."""
    if _F_SETPIPE_SZ is not None:
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass


# -- the child side: pure Python, never the extension ------------------------------------


def _child_entry(own: tuple[int, ...], mask: Any, child_main: Callable[..., int],
                 args: tuple[Any, ...]) -> None:
    code = _CHILD_EXIT_BROKEN
    try:
        try:
            _child_setup(own, mask)
            code = child_main(*own, *args)
        except BaseException:  # noqa: BLE001 - nothing may escape a child
            code = _CHILD_EXIT_BROKEN
        _flush_std_streams()
    finally:
        os._exit(code)


def _child_setup(own: tuple[int, ...], mask: Any) -> None:
    global _fork_lock, _parent_fds, _runs
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


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _send(fd: int, tag: str, data: Any) -> None:
    payload = pickle.dumps((tag, data), _PROTOCOL)
    if len(payload) <= _SMALL:
        _write_all(fd, _HEADER.pack(len(payload)) + payload)
    else:
        _write_all(fd, _HEADER.pack(len(payload)))
        _write_all(fd, payload)


def _read_into(fd: int, buf: bytearray) -> bool:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            return False
        got += n
    return True


def _receive(fd: int) -> tuple[str, Any] | None:
    head = bytearray(_HEADER.size)
    if not _read_into(fd, head):
        return None
    payload = bytearray(_HEADER.unpack(head)[0])
    if not _read_into(fd, payload):
        return None
    return pickle.loads(payload)


class _ChildOut:
    """What ``emit`` does in a child: buffer values and send them to the parent in frames."""

    def __init__(self, fd: int, send: bool) -> None:
        self.fd = fd
        self.send = send
        self.buffer: list[tuple[Any, Any]] = []
        self.since = 0.0
        #: While an attempt that may be retried runs, what it emits waits here.
        self.held: list[tuple[str | None, Any]] | None = None

    def emit(self, value: Any, to: str | None = None) -> None:
        if not self.send:
            return
        if self.held is not None:
            self.held.append((to, value))
            return
        self._add((to, value))

    def mark(self, kind: int, data: Any) -> None:
        self._add((kind, data))

    def hold(self) -> None:
        self.held = []

    def release(self, keep: bool) -> None:
        """End an attempt: send what it emitted if it succeeded (``keep``), else drop it."""
        held, self.held = self.held, None
        if keep:
            for entry in held or ():
                self._add(entry)

    def _add(self, entry: tuple[Any, Any]) -> None:
        if not self.buffer:
            self.since = time.monotonic()
        self.buffer.append(entry)
        if len(self.buffer) >= _FLUSH_VALUES or time.monotonic() - self.since >= _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            batch = self.buffer
            _send(self.fd, _VALUES, batch)
            self.buffer = []

    def finish(self) -> None:
        # The last values travel in the "done" frame: one frame per item in the common
        # case of a few results.
        _flush_std_streams()
        batch, self.buffer = self.buffer, []
        _send(self.fd, _DONE, batch)

    def fail(self, exc: BaseException, tag: str = _ERROR) -> None:
        # What was emitted before the error goes out, as it would from a thread (the parent
        # discards it if the item is retried); values that cannot be pickled are dropped.
        try:
            self.flush()
        except Exception:  # noqa: BLE001
            self.buffer = []
        _flush_std_streams()
        _send(self.fd, tag, _error_payload(exc))


def _error_payload(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    text = "".join(traceback.format_exception(exc))
    pickled = None
    if isinstance(exc, Exception):
        try:
            pickled = pickle.dumps(exc, _PROTOCOL)
        except Exception:  # noqa: BLE001 - reported as WorkerError instead
            pickled = None
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001
        message = "<str() failed>"
    return pickled, f"{type(exc).__module__}.{type(exc).__qualname__}", message, text


def _run_body(call: Callable[[Any], Any], mode: str, item: Any, out: _ChildOut) -> None:
    result = call(item)
    if result is None:
        return
    if mode == "iterate":
        for value in result:
            out.emit(value)
    else:
        out.emit(result)


def _run_chunk(call: Callable[[Any], Any], mode: str, items: list, careful: bool,
               out: _ChildOut, policy: RetryPolicy) -> None:
    """Run a fork_ipc chunk item by item, with retries, marking each item's outcome.
    ``careful``: send each item's values and marker before starting the next item, so that
    if this process dies, the parent knows exactly which item it died on."""
    for k, item in enumerate(items):
        attempt = 0
        while True:
            if policy.retries:
                out.hold()
            try:
                _run_body(call, mode, item, out)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                out.release(keep=False)
                if attempt < policy.retries and isinstance(exc, policy.retry_on):
                    attempt += 1
                    out.mark(_MARK_RETRIED, 1)
                    time.sleep(policy.delay(attempt))
                    continue
                out.mark(_MARK_FAILED, (k, _error_payload(exc)))
            else:
                out.release(keep=True)
            break
        out.mark(_MARK_FINISHED, k)
        if careful:
            out.flush()


def _spawn_child(wfd: int, after: list[Callable[[], Any]], call: Callable[[Any], Any],
                 mode: str, item: Any, send: bool) -> int:
    out = _ChildOut(wfd, send)
    context.set_child_emitter(out.emit)
    try:
        for hook in after:
            hook()
        _run_body(call, mode, item, out)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.fail(exc)
    else:
        out.finish()
    return _CHILD_EXIT_OK


def _ipc_child(wfd: int, rfd: int, after: list[Callable[[], Any]],
               open_worker: Callable[[], tuple[Callable[[Any], Any], Any]], mode: str,
               policy: RetryPolicy) -> int:
    out = _ChildOut(wfd, True)
    context.set_child_emitter(out.emit)
    try:
        for hook in after:
            hook()
        call, close = open_worker()
    except BaseException as exc:  # noqa: BLE001 - reported with the first message
        startup: BaseException | None = exc
    else:
        startup = None
    while True:
        message = _receive(rfd)
        if message is None:
            return _CHILD_EXIT_OK  # the parent closed the pipe (or is gone)
        tag, data = message
        if startup is not None:
            out.fail(startup, _FATAL)
            return _CHILD_EXIT_OK
        if tag == _CLOSE:
            try:
                if close is not None:
                    close()
            except BaseException as exc:  # noqa: BLE001
                out.fail(exc, _FATAL)
            else:
                out.finish()
            return _CHILD_EXIT_OK
        try:
            items, careful = data
            _run_chunk(call, mode, items, careful, out, policy)
        except BaseException as exc:  # noqa: BLE001 - e.g. a value that cannot be pickled
            out.fail(exc, _FATAL)
            return _CHILD_EXIT_OK
        out.finish()


# -- the parent side ----------------------------------------------------------------------


def _child_exception(stage: str, pid: int, payload: tuple[Any, ...]) -> BaseException:
    pickled, type_name, message, text = payload
    exc: Any = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:  # noqa: BLE001 - reported as WorkerError instead
            exc = None
    if not isinstance(exc, BaseException):
        exc = WorkerError(
            f"stage {stage!r}: child process {pid} raised {type_name}: {message} (the "
            "exception could not be sent to the parent as itself)",
            traceback_text=text,
        )
    else:
        try:
            exc.traceback_text = text
        except Exception:  # noqa: BLE001 - e.g. __slots__ exceptions: the note remains
            pass
    exc.add_note(f"[minigun] raised in forked child process {pid} of stage {stage!r}; "
                 f"the child's traceback:\n{text.rstrip()}")
    return exc


def _pump(child: _Child, tick: Callable[[], None], emit: Callable[..., None],
          mark: Callable[[int, Any], None] | None = None) -> tuple[str, Any]:
    """Read the child's frames, re-emitting values in this worker thread (and passing
    fork_ipc's markers to ``mark``), until it reports the work done (``("done", None)``),
    failed (``("error" | "fatal", exception)``) or the pipe ends without either
    (``("eof", None)``)."""
    while True:
        frame = _minigun.read_frame(child.rfd, tick, child.pid)
        if frame is None:
            return "eof", None
        tag, data = pickle.loads(frame)
        del frame
        if tag in (_VALUES, _DONE):
            for to, value in data:
                if to.__class__ is int:
                    mark(to, value)
                else:
                    emit(value, to)
            del data
            if tag == _DONE:
                return _DONE, None
        else:
            return tag, _child_exception(child.stage, child.pid, data)


class _Node:
    """What the parent needs to run one fork stage."""

    def __init__(self, run: Any, node: Any, mode: str) -> None:
        self.run = run
        self.path: str = node.path
        self.mode = mode
        self.before = _fork_hooks(node, _hooks.BEFORE_FORK)
        self.after = _fork_hooks(node, _hooks.AFTER_FORK)
        self.send_back = bool(node.downstream) or bool(node.scope.settings["use_ipc"])
        self.scopes = [id(s) for s in node.scope.lineage()]
        self.forks = _run_forks(run)

    def stopping(self) -> bool:
        return self.run.stopping

    def tick(self) -> None:
        if self.stopping():
            raise _Stopping(f"stage {self.path!r}: the run is stopping")



def _fork_hooks(node: Any, kind: str) -> list[Callable[[], Any]]:
    """Pipeline-wide hooks of every enclosing pipeline (outermost first), then the hooks
    scoped to this stage, or to a nested pipeline containing it (outermost first)."""
    lineage = node.scope.lineage()[::-1]
    wide = [s.bind(h) for s in lineage for h in s.hooks.of(kind)]
    scoped = []
    for scope in lineage:
        relative = node.path[len(scope.path) + 1:] if scope.path else node.path
        names = {relative, relative.split(".", 1)[0]}
        scoped += [scope.bind(h) for h in scope.hooks.all()
                   if h.kind == kind and h.stage is not None and h.stage in names]
    return wide + scoped


def _count(item: Any) -> int:
    return len(item) if isinstance(item, (list, tuple)) else 1


# spawn_fork -------------------------------------------------------------------------------


def _spawn_fork_call(fn: _Node, call: Callable[[Any], Any]) -> Callable[[Any], None]:
    emit = _minigun.emit

    def spawn_fork(item: Any) -> None:
        fn.forks.acquire(fn)
        try:
            child = _spawn(fn.forks, fn.path, _count(item), fn.before, _spawn_child,
                           (fn.after, call, fn.mode, item, fn.send_back), duplex=False)
            child.items = _count(item)
            try:
                outcome, error = _pump(child, fn.tick, emit)
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

    def __init__(self, fn: _Node, open_worker: Callable[[], tuple[Callable[[Any], Any], Any]],
                 policy: RetryPolicy):
        self.fn = fn
        self.open_worker = open_worker
        self.policy = policy
        self.child: _Child | None = None

    def _start(self) -> _Child:
        self.fn.tick()
        child = _spawn(self.fn.forks, self.fn.path, 0, self.fn.before, _ipc_child,
                       (self.fn.after, self.open_worker, self.fn.mode, self.policy),
                       duplex=True)
        self.child = child
        return child

    def _drop(self, kill: bool) -> None:
        child, self.child = self.child, None
        if child is not None:
            child.kill() if kill else child.wait(self.fn.stopping)

    def _exchange(self, message: bytes,
                  mark: Callable[[int, Any], None] | None = None) -> tuple[str, Any]:
        """Send one message and collect the reply. A worker found dead before it could
        read the message (killed while idle) is replaced once, transparently."""
        for attempt in (1, 2):
            child = self.child
            if child is not None and _minigun.exited(child.pid):
                self._drop(kill=True)  # died while idle: reap it, fork a fresh one
                child = None
            child = child or self._start()
            delivered = True
            try:
                try:
                    _minigun.write_frame(child.wfd, message, self.fn.tick)
                except BrokenPipeError:
                    delivered = False  # gone; its last frames (if any) say why
                outcome, error = _pump(child, self.fn.tick, _minigun.emit, mark)
            except BaseException:
                # Stopping, or a re-emitted value was refused: the child may be mid-item.
                self._drop(kill=True)
                raise
            if outcome == "eof":
                self._drop(kill=True)
                if not delivered and attempt == 1:
                    continue
                return "error", child.died_error()
            if outcome == _FATAL:
                self._drop(kill=False)
            return outcome, error
        raise AssertionError("unreachable")

    def call(self, items: list) -> tuple[int, list] | None:
        """Run one chunk in the child: ``(retries, [(item, exception), ...])`` for the
        runtime (None when nothing failed or was retried).

        The child reports its items' values and outcomes in batches. If it dies mid-chunk,
        the items it had not reported go again to a fresh child in careful mode (each item
        reported before the next starts): the item that kills that child fails with a
        WorkerError, the rest complete. Values of unreported items never reached the
        parent, so nothing is delivered twice, but those items' code may run twice."""
        retries = 0
        failures: list[tuple[Any, BaseException]] = []
        start = 0
        careful = False
        while start < len(items):
            finished = 0

            def mark(kind: int, data: Any, start: int = start) -> None:
                nonlocal retries, finished
                if kind == _MARK_FINISHED:
                    finished = data + 1
                elif kind == _MARK_RETRIED:
                    retries += data
                else:
                    k, payload = data
                    pid = self.child.pid if self.child else 0
                    failures.append((items[start + k],
                                     _child_exception(self.fn.path, pid, payload)))

            message = pickle.dumps((_CHUNK, (items[start:], careful)), _PROTOCOL)
            outcome, error = self._exchange(message, mark)
            if outcome == _DONE:
                break
            if outcome == _FATAL:
                raise error
            if careful:
                # It died on the first item it had not reported: that item fails.
                failures.append((items[start + finished], error))
                start += finished + 1
                careful = False
            else:
                start += finished
                careful = True
        if self.child is not None:
            self.child.items += len(items)
        return (retries, failures) if retries or failures else None

    def close(self) -> None:
        if self.child is None:
            return
        outcome, error = self._exchange(pickle.dumps((_CLOSE, None), _PROTOCOL))
        self._drop(kill=False)
        if error is not None:
            raise error


def _ipc_factory(fn: _Node, call: Callable[[Any], Any] | None,
                 make_worker: Callable[[], tuple[Any, Any]] | None,
                 policy: RetryPolicy) -> Callable[[], tuple]:
    if make_worker is not None:
        open_worker = make_worker  # a custom Stage: open() runs in the child
    else:
        def open_worker() -> tuple[Callable[[Any], Any], None]:
            return call, None

    def make_ipc_worker() -> tuple[Callable[[list], Any], Callable[[], None]]:
        worker = _IpcWorker(fn, open_worker, policy)
        return worker.call, worker.close

    return make_ipc_worker


# -- the process budget of a run ------------------------------------------------------------


class _RunForks:
    """Children of one run: the live ones (for clean-up) and the max_processes budget.

    Per pipeline scope, each fork stage below it holds a standing reservation: a fork_ipc
    stage one process per worker, a spawn_fork stage one process (its guaranteed child).
    What the scope's limit leaves over is a pool that spawn_fork stages draw on for their
    second and later concurrent children. So children alive in a scope never exceed
    ``max(max_processes, number of fork stages in it)``, and no stage waits on another.
    """

    def __init__(self, run: Any) -> None:
        self.cond = threading.Condition()
        self.children: dict[int, _Child] = {}
        self.limit: dict[int, int] = {}
        self.reserved: dict[int, int] = {}
        self.extra: dict[int, int] = {}
        self.stage_alive: dict[str, int] = {}
        self.ipc_workers: dict[str, int] = {}
        self._plan(run)

    def _plan(self, run: Any) -> None:
        """Reserve the fork stages' processes; lower fork_ipc process counts (each keeps
        one) where a scope's fork stages need more than its max_processes together."""
        scopes = run._graph.scopes()
        for scope in scopes:
            self.limit[id(scope)] = scope.settings["max_processes"]
        forking: list[tuple[Any, str, int]] = []
        for node in run._graph.nodes:
            strategy, workers = plan(node.stage, node.scope.settings, None)
            if strategy in ("fork_ipc", "spawn_fork"):
                forking.append((node, strategy, workers if strategy == "fork_ipc" else 1))
        wanted = {node.path: n for node, _, n in forking}
        count = dict(wanted)
        for scope in scopes:
            members = [n.path for n, _, _ in forking if scope in n.scope.lineage()]
            ipc = [n.path for n, kind, _ in forking
                   if kind == "fork_ipc" and n.path in members]
            while ipc and sum(count[p] for p in members) > self.limit[id(scope)]:
                widest = max(ipc, key=lambda p: count[p])
                if count[widest] <= 1:
                    break
                count[widest] -= 1
        for node, strategy, _ in forking:
            path = node.path
            if count[path] < wanted[path]:
                logger.warning(
                    "stage %r asks for %d fork_ipc processes, but with the other fork stages "
                    "of its pipeline that is more than max_processes=%d; using %d (raise "
                    "max_processes to allow more)", path, wanted[path],
                    node.scope.settings["max_processes"], count[path])
            for scope in node.scope.lineage():
                self.reserved[id(scope)] = self.reserved.get(id(scope), 0) + count[path]
            if strategy == "fork_ipc":
                self.ipc_workers[path] = count[path]

    def acquire(self, fn: _Node) -> None:
        """Wait for room for one more spawn_fork child of ``fn``'s stage."""
        with self.cond:
            while True:
                # Checked even when there is room: a child killed because the run stops
                # frees room, and no new child may take it.
                fn.tick()
                if self._room(fn):
                    break
                self.cond.wait(_POLL)
            alive = self.stage_alive.get(fn.path, 0)
            self.stage_alive[fn.path] = alive + 1
            if alive:
                for s in fn.scopes:
                    self.extra[s] = self.extra.get(s, 0) + 1

    def _room(self, fn: _Node) -> bool:
        if not self.stage_alive.get(fn.path):
            return True  # the stage's own reserved process
        return all(self.extra.get(s, 0) + self.reserved.get(s, 0) < self.limit[s]
                   for s in fn.scopes)

    def most_children(self, fn: _Node) -> int:
        """The most children ``fn``'s spawn_fork stage can ever have alive at once."""
        return 1 + min(max(0, self.limit[s] - self.reserved.get(s, 0)) for s in fn.scopes)

    def release(self, fn: _Node) -> None:
        with self.cond:
            alive = self.stage_alive[fn.path]
            self.stage_alive[fn.path] = alive - 1
            if alive > 1:
                for s in fn.scopes:
                    self.extra[s] -= 1
            self.cond.notify_all()

    def remember(self, child: _Child) -> None:
        with self.cond:
            self.children[child.pid] = child

    def forget(self, child: _Child) -> None:
        with self.cond:
            self.children.pop(child.pid, None)

    def live(self) -> list[_Child]:
        with self.cond:
            return list(self.children.values())


_runs_lock = threading.Lock()
_runs: weakref.WeakKeyDictionary[Any, _RunForks] = weakref.WeakKeyDictionary()


def _run_forks(run: Any) -> _RunForks:
    with _runs_lock:
        forks = _runs.get(run)
        if forks is None:
            forks = _runs[run] = _RunForks(run)
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


def fork_call(run: Any, node: Any, strategy: str, workers: int, call: Callable[[Any], Any] | None,
              mode: str, make_worker: Callable[[], tuple[Any, Any]] | None
              ) -> tuple[Any, str, int, Any]:
    """Replace a fork stage's call for the runtime: returns ``(call, mode, workers,
    make_worker)``. The stage function (``call``, or ``make_worker`` for a custom Stage)
    then runs in forked children; the returned call runs in the parent's worker thread,
    forwards what the child emits, and raises what the child raised."""
    fn = _Node(run, node, mode)
    if strategy == "spawn_fork":
        # No more worker threads than children the budget could ever allow this stage.
        workers = max(1, min(workers, fn.forks.most_children(fn)))
        if make_worker is None:
            assert call is not None
            return _spawn_fork_call(fn, call), "value", workers, None
        inner = make_worker

        def make_spawning_worker() -> tuple[Callable[[Any], None], Any]:
            process, close = inner()
            return _spawn_fork_call(fn, process), close

        return None, "value", workers, make_spawning_worker
    if strategy == "fork_ipc":
        workers = fn.forks.ipc_workers.get(node.path, workers)
        # Items travel in the runtime's chunks; the child retries, the runtime counts.
        return None, "chunk", workers, _ipc_factory(fn, call, make_worker,
                                                      RetryPolicy(node.stage, node.scope.settings))
    raise ValueError(f"fork_call: {strategy!r} is not a fork strategy")
