"""The item contract on the far side of a process boundary, written once.

A forked child (and a subinterpreter, a Ray actor or task) runs stage code away from the
Rust runtime, so the guarantees the runtime gives its own threads are kept here, in pure
Python: call the stage (function, generator, or a custom Stage's per-worker
``open``/``process``/``close``), retry with back-off, discard what a failed attempt
emitted, report each item's outcome on its own, and check ``emit(to=)`` against the
stage's declared downstreams. This module must never import the extension
(``minigun._minigun``): a forked child may not call into it, and a subinterpreter cannot
load it.

What travels back is a stream of frames, each a pickled ``(tag, entries)``. An entry is
``(to, value)`` for an emitted value, or ``(mark, data)`` with an int ``mark`` (an int
never clashes with ``to``, a stage name or None) for what the parent must know about the
items of a chunk:

* ``(MARK_RETRIED, n)``: n more retries happened;
* ``(MARK_FAILED, (k, error payload))``: item k of the chunk failed after its retries;
* ``(MARK_FINISHED, k)``: item k is done; the values before this mark are all of its values.

In a chunk, an item's values are sent only together with its outcome, and the parent
delivers them only when it reads the item's ``MARK_FINISHED``. So a worker that dies in
the middle of an item has delivered nothing of it, and the item can run again elsewhere
without any value arriving twice.
"""

from __future__ import annotations

import os
import pickle
import struct
import time
import traceback
from collections.abc import Callable, Collection, Iterable
from typing import Any

from .config import RetryPolicy
from .errors import WorkerError

PROTOCOL = pickle.HIGHEST_PROTOCOL
HEADER = struct.Struct("<Q")

#: Frame tags, worker to parent: values and marks; the reply is complete; the item (or
#: the whole reply) failed; the reply is complete and this worker retires (it could not
#: start, so the next chunk needs a fresh one).
VALUES, DONE, ERROR, FATAL, RETIRED = "values", "done", "error", "fatal", "retired"
#: Message tags, parent to worker.
CHUNK, CLOSE = "chunk", "close"
MARK_FINISHED, MARK_FAILED, MARK_RETRIED = 0, 1, 2

#: A streaming worker sends what it emitted when this many values are buffered, or when
#: the oldest buffered value is this old (checked at each emit); a chunk worker checks the
#: same at each item's end.
FLUSH_VALUES = 256
FLUSH_SECONDS = 0.05

Send = Callable[[bytes], None]
Call = Callable[[Any], Any]
#: Starts a worker: runs its after_fork hooks and open(); returns (process, close).
Start = Callable[[], tuple[Call, Callable[[], Any] | None]]


def error_payload(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    """What the parent needs to re-raise ``exc``: the pickled exception (None if it
    cannot be pickled), its type name, its message and its formatted traceback."""
    text = "".join(traceback.format_exception(exc))
    pickled = None
    if isinstance(exc, Exception):
        try:
            pickled = pickle.dumps(exc, PROTOCOL)
        except Exception:  # noqa: BLE001 - reported as WorkerError instead
            pickled = None
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001
        message = "<str() failed>"
    return pickled, f"{type(exc).__module__}.{type(exc).__qualname__}", message, text


def unpicklable_error(stage: str, values: Iterable[Any], exc: BaseException) -> WorkerError:
    """The error of an item whose emitted values cannot be pickled back to the parent."""
    culprit = "a value"
    for value in values:
        try:
            pickle.dumps(value, PROTOCOL)
        except Exception:  # noqa: BLE001 - this is the one we are looking for
            kind = type(value)
            culprit = f"a value of type {kind.__module__}.{kind.__qualname__}"
            break
    error = WorkerError(
        f"stage {stage!r} emitted {culprit} that cannot be pickled to send it back to the "
        f"parent process ({type(exc).__name__}: {exc}); emit picklable values, or run "
        "the stage with strategy='threads'"
    )
    error.__cause__ = exc
    return error


class Outbox:
    """What ``emit`` does in a worker: check the target, buffer, and send frames.

    ``streaming``: values go out as they come (a spawn_fork child: one item per worker,
    and an unpicklable value is an error raised at the emit that flushes it). Otherwise
    values are held per item and sent with the item's outcome (see the module doc)."""

    def __init__(
        self,
        send: Send,
        stage: str,
        routes: Collection[str],
        route_error: Callable[[str], BaseException],
        deliver: bool = True,
        streaming: bool = False,
        before_reply: Callable[[], None] | None = None,
    ) -> None:
        self._send = send
        #: Called before a reply's last frame (a forked child flushes its stdout there).
        self.before_reply = before_reply
        self.stage = stage
        self.routes = routes
        self.route_error = route_error
        self.deliver = deliver
        self.streaming = streaming
        self.buffer: list[tuple[Any, Any]] = []
        self.since = 0.0
        #: What the attempt in progress emitted, held back until its outcome is known.
        self.held: list[tuple[Any, Any]] | None = None

    def emit(self, value: Any, to: str | None = None) -> None:
        if to is not None and to not in self.routes:
            raise self.route_error(to)
        if not self.deliver:
            return
        if self.held is not None:
            self.held.append((to, value))
        else:
            self._add((to, value))

    def hold(self) -> None:
        self.held = []

    def release(self, keep: bool) -> None:
        """End an attempt: keep what it emitted, or drop it."""
        held, self.held = self.held, None
        if keep and held:
            if not self.buffer:
                self.since = time.monotonic()
            self.buffer.extend(held)

    def mark(self, kind: int, data: Any) -> None:
        if not self.buffer:
            self.since = time.monotonic()
        self.buffer.append((kind, data))

    def _add(self, entry: tuple[Any, Any]) -> None:
        self.mark(*entry)
        if self.streaming:
            self.flush_if_due()

    def flush_if_due(self) -> None:
        if len(self.buffer) >= FLUSH_VALUES or time.monotonic() - self.since >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self._frame(VALUES)

    def finish(self, tag: str = DONE) -> None:
        """Send the reply's last entries (one frame per reply in the common case)."""
        if self.before_reply is not None:
            self.before_reply()
        self._frame(tag)

    def fail(self, exc: BaseException, tag: str = ERROR) -> None:
        """Report ``exc``. What is buffered goes out first (in a chunk: the values and
        outcomes of the items that finished; values that cannot be pickled are dropped)."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001
            self.buffer = []
        if self.before_reply is not None:
            self.before_reply()
        self._send(_dumps((tag, error_payload(exc))))

    def _frame(self, tag: str) -> None:
        entries, self.buffer = self.buffer, []
        try:
            payload = _dumps((tag, entries))
        except Exception as exc:  # noqa: BLE001 - a value that cannot be pickled
            if self.streaming:
                raise unpicklable_error(
                    self.stage, (v for t, v in entries if t.__class__ is not int), exc
                ) from exc
            payload = _dumps((tag, self._salvage(entries)))
        self._send(payload)

    def _salvage(self, entries: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """Entries with each item whose values cannot be pickled turned into a failure of
        that item (its values dropped)."""
        kept: list[tuple[Any, Any]] = []
        item: list[tuple[Any, Any]] = []
        for entry in entries:
            item.append(entry)
            if entry[0].__class__ is int and entry[0] == MARK_FINISHED:
                kept += self._checked(item)
                item = []
        return kept + self._checked(item)

    def _checked(self, item: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        try:
            pickle.dumps(item, PROTOCOL)
            return item
        except Exception as exc:  # noqa: BLE001
            values = [v for t, v in item if t.__class__ is not int]
            marks = [(t, v) for t, v in item if t.__class__ is int]
            finished = [m for m in marks if m[0] == MARK_FINISHED]
            if not finished:
                return []  # cannot happen: chunks flush at item boundaries
            failed = any(m[0] == MARK_FAILED for m in marks)
            if not failed:
                k = finished[0][1]
                error = unpicklable_error(self.stage, values, exc)
                marks.insert(len(marks) - 1, (MARK_FAILED, (k, error_payload(error))))
            return marks


def _dumps(frame: tuple[str, Any]) -> bytes:
    return pickle.dumps(frame, PROTOCOL)


def _results(call: Call, mode: str, item: Any, out: Outbox) -> None:
    """Call the stage on one item and emit what it produces (processor rules)."""
    result = call(item)
    if result is None:
        return
    if mode == "iterate":
        for value in result:
            out.emit(value)
    else:
        out.emit(result)


def run_one(start: Start, mode: str, item: Any, out: Outbox, policy: RetryPolicy) -> None:
    """A worker for one item (spawn_fork): start it once, try the item up to
    ``policy.retries + 1`` times (:func:`run_chunk`: a failed attempt's emits are dropped,
    the item's outcome is marked), close it whatever the item did (so what close() emits
    goes back once), and report. The worker's emits, close()'s included, stream back."""
    try:
        call, close = start()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.fail(exc)
        return
    failure: BaseException | None = None
    try:
        run_chunk(call, mode, [item], False, out, policy)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        failure = exc
    # A worker that was opened is closed, whatever its item did (as in the runtime).
    if close is not None:
        try:
            close()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            failure = failure or exc
    if failure is None:
        try:
            out.finish()  # sends what is still buffered: an unpicklable value fails here
            return
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            failure = exc
    out.fail(failure)


def run_chunk(
    call: Call,
    mode: str,
    items: list[Any],
    careful: bool,
    out: Outbox,
    policy: RetryPolicy,
    stopping: Callable[[], bool] | None = None,
) -> None:
    """Run a chunk item by item, with retries, marking each item's outcome. ``careful``:
    send each item's values and outcome before starting the next item, so that if this
    process dies, the parent knows exactly which item it died on. ``stopping``: asked
    before each item; once true, the rest of the chunk is left unstarted (a worker the
    parent cannot kill, a subinterpreter, stops between items)."""
    for k, item in enumerate(items):
        if stopping is not None and stopping():
            return
        attempt = 0
        while True:
            out.hold()  # every attempt's emits wait for its outcome, retried or not
            try:
                _results(call, mode, item, out)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                if attempt < policy.retries and isinstance(exc, policy.retry_on):
                    out.release(keep=False)
                    attempt += 1
                    out.mark(MARK_RETRIED, 1)
                    time.sleep(policy.delay(attempt))
                    continue
                # As in the runtime's threads: a failed item delivers nothing.
                out.release(keep=False)
                out.mark(MARK_FAILED, (k, error_payload(exc)))
            else:
                out.release(keep=True)
            break
        out.mark(MARK_FINISHED, k)
        if careful:
            out.flush()
        else:
            out.flush_if_due()


class ChunkServer:
    """A long-lived worker (fork_ipc; subinterpreter and Ray workers): started once, then
    answers messages, one reply each, through its ``out``.

    A worker that cannot start (an after_fork hook or open() raised) fails each item of
    the chunk it is given, one by one, with that error, and retires: the parent starts a
    fresh worker for the next chunk."""

    def __init__(
        self,
        out: Outbox,
        start: Start,
        mode: str,
        policy: RetryPolicy,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.out = out
        self.mode = mode
        self.policy = policy
        self.stopping = stopping
        self.close: Callable[[], Any] | None = None
        self.startup: BaseException | None = None
        try:
            self.call, self.close = start()
        except BaseException as exc:  # noqa: BLE001 - reported with the first chunk
            self.startup = exc

    def abandoned(self) -> None:
        """The parent stopped sending (the run is stopping, or the parent is gone): close
        the worker all the same (nobody is left to hear how that went)."""
        try:
            if self.startup is None and self.close is not None:
                self.close()
        except BaseException:  # noqa: BLE001 - nobody to report it to
            pass

    def handle(self, message: tuple[str, Any]) -> bool:
        """Answer one message; False when the worker is done (closed, or retired)."""
        out = self.out
        tag, data = message
        if tag == CLOSE:
            try:
                if self.startup is None and self.close is not None:
                    self.close()
            except BaseException as exc:  # noqa: BLE001
                out.fail(exc, FATAL)
            else:
                out.finish()
            return False
        items, careful = data
        if self.startup is not None:
            failure = error_payload(self.startup)
            for k in range(len(items)):
                out.mark(MARK_FAILED, (k, failure))
                out.mark(MARK_FINISHED, k)
            out.finish(RETIRED)
            return False
        try:
            run_chunk(self.call, self.mode, items, careful, out, self.policy, self.stopping)
        except BaseException as exc:  # noqa: BLE001 - nothing may escape a worker
            out.fail(exc, FATAL)
            return False
        out.finish()
        return True


def serve(
    receive: Callable[[], tuple[str, Any] | None],
    out: Outbox,
    start: Start,
    mode: str,
    policy: RetryPolicy,
    stopping: Callable[[], bool] | None = None,
) -> None:
    """A long-lived worker on a pipe: start, then answer chunks until told to close or
    the parent goes away (the pipe ends)."""
    server = ChunkServer(out, start, mode, policy, stopping)
    while (message := receive()) is not None and server.handle(message):
        pass
    if message is None:
        server.abandoned()


# -- frames on pipes (a forked worker's transport) ------------------------------------------


def pipe_sender(fd: int) -> Send:
    """Write length-prefixed frames to ``fd`` (blocking)."""

    def send(payload: bytes) -> None:
        if len(payload) <= 64 * 1024:
            _write_all(fd, HEADER.pack(len(payload)) + payload)
        else:
            _write_all(fd, HEADER.pack(len(payload)))
            _write_all(fd, payload)

    return send


def pipe_receiver(fd: int) -> Callable[[], tuple[str, Any] | None]:
    """Read one length-prefixed pickled message from ``fd``; None at end of stream."""

    def receive() -> tuple[str, Any] | None:
        head = bytearray(HEADER.size)
        if not _read_into(fd, head):
            return None
        payload = bytearray(HEADER.unpack(head)[0])
        if not _read_into(fd, payload):
            return None
        message: tuple[str, Any] = pickle.loads(payload)
        return message

    return receive


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_into(fd: int, buf: bytearray) -> bool:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            return False
        got += n
    return True
