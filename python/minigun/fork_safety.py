"""Forking safely from a process full of runtime threads, and the forked child's set-up.

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
* The fork happens with the Rust fork gate closed (``ext.fork_gate_close``): no
  minigun thread is creating or deleting its Python thread state at that instant, which
  would leave the child deadlocked in ``PyOS_AfterFork_Child`` on CPython 3.11/3.12.
* Every ``Run`` the child inherited has its runtime replaced by a stub that raises a clear
  :class:`~minigun.errors.MinigunError` (``mg.trigger`` from a child, for example), so a
  child cannot even reach the parent's runtime by mistake.
* Nothing the child inherited is ever freed in it: its first act is ``gc.freeze()`` (not
  on free-threaded builds, see ``_FREEZE_IN_CHILD``), so its collector never examines
  (and never finalizes) the parent's objects, and the runtimes it detaches (below) are
  kept alive. Freeing an inherited extension object
  would run Rust code, which may wait for a lock another parent thread held at the fork
  (PyO3's pending-decref pool, a run's mutexes). What the child itself creates is
  collected as usual.
* The child never touches the std streams it inherited (another thread may have held
  their locks at the fork): it gets fresh ``sys.stdout``/``sys.stderr`` over fds 1 and 2,
  which the parent made for its children and never writes to.
* Pipes are created and forks happen under one lock, and each child closes the parent's
  fds that the fork gate listed (every live child's pipes and pidfds, the runs' wake-up
  fds), so a pipe's end of stream is seen as soon as its child exits. Those fds are closed
  in the parent only through the gate, so none on the list can be closed (and its number
  reused) between the listing and the fork.
* Signals: SIGINT and SIGTERM are blocked in the forking thread across the fork, so the
  child cannot take a Ctrl-C before it has set SIGINT to "ignore". A child ignores SIGINT
  (the parent coordinates a Ctrl-C) and takes SIGTERM as "stop now, gracefully": the item
  in hand is interrupted with :class:`ChildTerminated`, no further item starts, and the
  worker is closed before the child exits (the parent SIGKILLs it after a grace period).
  These calls go to ``_signal``, the C module under ``signal``: ``signal``'s wrappers turn
  every number they return into an enum member, and in a child each object touched is a
  page copied (a third of the faults of the child's set-up, before).
* The "multi-threaded fork" DeprecationWarning of Python 3.12+ is filtered for forks made
  by this module only (the filter matches this module's name).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found,unused-ignore]  # signal's C module
import gc
import io
import os
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

try:
    import fcntl

    _F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)
except ImportError:  # pragma: no cover - no fork there either
    _F_SETPIPE_SZ = None

from . import context
from .errors import MinigunError, WorkerError
from .native import ext

CHILD_EXIT_OK, CHILD_EXIT_BROKEN = 0, 70


class ChildTerminated(BaseException):
    """Raised in a forked child's item when the parent terminates it (SIGTERM): the run
    is stopping. A BaseException, so ``retry_on=Exception`` does not retry it."""


#: In a child: SIGTERM arrived; and whether an item's call is running (only then does
#: the signal interrupt it: a worker's open() or close() is left to finish).
_terminating = False
_in_item = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _terminating
    _terminating = True
    if _in_item:
        raise ChildTerminated("the parent terminated this child: the run is stopping")


def interruptible(call: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """In a child: ``call`` that SIGTERM interrupts, and that refuses items after it."""

    def item_call(item: Any) -> Any:
        global _in_item
        _in_item = True  # first: a SIGTERM from here on raises, one before it is seen below
        try:
            if _terminating:
                raise ChildTerminated("the parent terminated this child: the run is stopping")
            return call(item)
        finally:
            _in_item = False

    return item_call


T = TypeVar("T")

_fork_lock = threading.Lock()
_warning_filter: Any = None
_warning_filter_lock = threading.Lock()


def _quiet_fork_warning() -> None:
    """Filter 3.12+'s "multi-threaded, use of fork() may lead to deadlocks" warning for
    forks called from this module only (the warning is attributed to the caller of
    os.fork).

    The filter must come first: ``catch_warnings`` (pytest wraps every test in one) and
    the user's own ``filterwarnings`` put theirs in front, and an "always" for
    DeprecationWarning ahead of it shows the warning. So it is put back in front whenever
    it is not there. Under a lock: the workers of several fork stages fork at once, and
    ``filterwarnings`` removes an equal filter before it inserts."""
    global _warning_filter
    with _warning_filter_lock:
        filters = warnings.filters
        if _warning_filter is not None and filters and filters[0] == _warning_filter:
            return
        warnings.filterwarnings(
            "ignore",
            message=r".*use of fork\(\) may lead to deadlocks",
            category=DeprecationWarning,
            module=r"minigun\.fork_safety\Z",
        )
        _warning_filter = warnings.filters[0]


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer (fewer wake-ups for large results); fine if refused."""
    if _F_SETPIPE_SZ is not None:
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass


def fork_child(
    child_main: Callable[..., int],
    args: tuple[Any, ...],
    duplex: bool,
    adopt: Callable[[int, int, int | None], T],
) -> T:
    """Fork a child that runs ``child_main(wfd, [rfd,] *args)`` and exits with what it
    returns. In the parent, ``adopt(pid, rfd, wfd)`` takes charge of the child and its
    pipe ends (the child's result pipe, and for ``duplex`` its input pipe), still under
    the fork lock, and its result is returned."""
    _quiet_fork_warning()
    _refuse_beside_running_subinterpreters()
    blocked = {_signal.SIGINT, _signal.SIGTERM}
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
            mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, blocked)
            streams = _child_streams()
            # No minigun thread creates or deletes its thread state during the fork, and
            # no listed fd is closed before the child has closed its copy.
            inherited = ext.fork_gate_close()
            try:
                pid = os.fork()
                if pid == 0:
                    own = (w, cr) if duplex else (w,)
                    # The parent's ends of this child's own pipes go too: a worker that
                    # kept its input's write end open would never see the end of it.
                    theirs = [r, cw] if duplex else [r]
                    _child_entry(own, inherited + theirs, mask, streams, child_main, args)
            finally:
                ext.fork_gate_open()
                _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(w)
        if duplex:
            os.close(cr)
        return adopt(pid, r, cw if duplex else None)


def _refuse_beside_running_subinterpreters() -> None:
    """Refuse to fork while subinterpreters run in this process (another run's
    ``interpreters`` workers, say): CPython crashes a child forked then (CPython issue
    101437), and its items would be lost. A run of its own never has both (``plan``
    refuses it), and the idle subinterpreters minigun keeps are destroyed before any fork
    (:mod:`minigun.interpreters`)."""
    interpreters = sys.modules.get("_interpreters")
    if interpreters is None:
        return  # nothing in this process made a subinterpreter through the standard module
    main = interpreters.get_main()[0]
    running = [i for i, _ in interpreters.list_all() if i != main and interpreters.is_running(i)]
    if running:
        raise WorkerError(
            f"cannot fork while {len(running)} subinterpreter(s) run in this process: CPython "
            "crashes a child forked then (CPython issue 101437). Run the forking stage when no "
            "run with subinterpreter stages is going on, or give it strategy 'threads'"
        )


# -- the std streams a child gets ----------------------------------------------------------


class _StreamSettings(NamedTuple):
    """What a fresh copy of one of the parent's std streams is made from."""

    name: str
    fd: int
    encoding: str
    errors: str | None
    line_buffering: bool


class _ChildStream(NamedTuple):
    """A std stream made in the parent for its children, never written to there."""

    settings: _StreamSettings
    stream: Any


#: In the parent: the streams made for children, by stream name.
_streams_for_children: dict[str, _ChildStream] = {}


def _child_streams() -> list[_ChildStream]:
    """In the parent, before a fork (under the fork lock): a ``sys.__stdout__`` and a
    ``sys.__stderr__`` for the child, over fds 1 and 2.

    The child must not use the streams it inherits: another parent thread may have been
    inside a write or flush (holding the buffer's lock, and on free-threaded builds the
    stream's own) at the instant of the fork, and the child would wait for that lock
    forever. It must not even read their settings, which on free-threaded CPython takes
    the stream's lock (seen: a child blocked in ``TextIOWrapper.errors``).

    So the parent reads the settings and makes the child's streams. It makes them once
    per settings and keeps them for every later child: no parent thread ever writes to
    them, so each child inherits them unlocked and empty, and does not pay for building
    them (a codec lookup and six objects, each page it touches a page copied)."""
    streams = []
    for name, fd in (("stdout", 1), ("stderr", 2)):
        original = getattr(sys, f"__{name}__")
        if original is None:
            continue
        try:
            settings = _StreamSettings(
                name, fd, original.encoding, original.errors, original.line_buffering
            )
        except Exception:  # noqa: BLE001 - not a usable text stream: keep what there is
            continue
        made = _streams_for_children.get(name)
        if made is None or made.settings != settings:
            try:
                stream = io.TextIOWrapper(
                    io.BufferedWriter(io.FileIO(fd, "w", closefd=False)),
                    encoding=settings.encoding,
                    errors=settings.errors,
                    line_buffering=settings.line_buffering,
                )
            except Exception:  # noqa: BLE001 - no such fd: keep what there is
                continue
            made = _streams_for_children[name] = _ChildStream(settings, stream)
        streams.append(made)
    return streams


# -- the child side: pure Python, never the extension ------------------------------------

#: In a child: the std streams it inherited, kept alive and untouched until os._exit.
_inherited_streams: list[Any] = []

#: In a child: the streams :func:`_install_std_streams` gave it.
_own_streams: list[Any] = []


def _install_std_streams(streams: list[_ChildStream]) -> None:
    """In a child: make the streams the parent made for it (:func:`_child_streams`) its
    ``sys.__stdout__`` and ``sys.__stderr__``, and its ``sys.stdout`` / ``sys.stderr``
    where those were the originals.

    The child never writes out what the parent had buffered in the inherited streams (the
    parent writes that itself). The originals are replaced even when ``sys.stdout`` was
    replaced (as pytest's capture does): code that writes to ``sys.__stdout__`` must not
    block either. Streams the user put in ``sys.stdout`` or ``sys.stderr`` are left
    there."""
    # They are this process's own streams now, written to: a child it forks in turn gets
    # streams made for it.
    _streams_for_children.clear()
    for settings, stream in streams:
        name = settings.name
        original = getattr(sys, f"__{name}__")
        _inherited_streams.append(original)  # never finalized: that would flush it
        _own_streams.append(stream)
        if getattr(sys, name) is original:
            setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def flush_child_streams() -> None:
    """Flush the child's ``sys.stdout`` and ``sys.stderr``, and the streams over fds 1 and
    2 made for it (see :func:`_child_streams`)."""
    streams = [sys.stdout, sys.stderr]
    streams += [s for s in _own_streams if s is not sys.stdout and s is not sys.stderr]
    for stream in streams:
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - a broken stdout must not break a child
            pass


def _child_entry(
    own: tuple[int, ...],
    inherited: list[int],
    mask: Any,
    streams: list[_ChildStream],
    child_main: Callable[..., int],
    args: tuple[Any, ...],
) -> None:
    code = CHILD_EXIT_BROKEN
    try:
        try:
            _child_setup(own, inherited, mask, streams)
            code = child_main(*own, *args)
        except BaseException:  # noqa: BLE001 - nothing may escape a child
            code = CHILD_EXIT_BROKEN
        flush_child_streams()
    finally:
        os._exit(code)


#: ``gc.freeze()`` in a forked child deadlocks on free-threaded CPython 3.13.5 (observed:
#: its stop-the-world waits forever on the runtime's stop-the-world mutex, while
#: ``gc.collect()`` in the same child works). There the child goes without it.
_FREEZE_IN_CHILD = "t" not in getattr(sys, "abiflags", "")  # "t": free-threaded


def _child_setup(
    own: tuple[int, ...], inherited: list[int], mask: Any, streams: list[_ChildStream]
) -> None:
    global _fork_lock
    if _FREEZE_IN_CHILD:
        gc.freeze()
    _install_std_streams(streams)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    _signal.signal(_signal.SIGTERM, _on_sigterm)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
    for fd in inherited:
        if fd not in own:
            try:
                os.close(fd)
            except OSError:
                pass
    # A fresh lock: the parent's was held across the fork.
    _fork_lock = threading.Lock()
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


#: In a child: the runtimes of the parent's runs, kept alive so that replacing them never
#: frees one (which would run the extension's code in the child).
_inherited_runtimes: list[Any] = []


def _detach_runs() -> None:
    parent = os.getppid()
    for run in context.runs_after_fork():
        try:
            _inherited_runtimes.append(run.detach_runtime(_ParentRuntime(parent)))
        except Exception:  # noqa: BLE001 - a child must start whatever its parent's runs are
            pass
