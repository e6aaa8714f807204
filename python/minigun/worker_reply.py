"""The parent's side of the item contract with a worker elsewhere (a forked child, a
subinterpreter, a Ray actor or task): reading what :mod:`minigun.worker_loop` reports.

A worker's reply is a stream of entries (see worker_loop's module doc): values, each
item's outcome, retries made. An item's values are held here until its outcome arrives
and delivered only then, so values of an item the worker did not finish are never
delivered (the item can run again elsewhere without any value arriving twice).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from typing import Any

from . import worker_loop as loop
from .errors import WorkerError

#: Delivers one value downstream: ``(value, to)``, as ``mg.emit`` takes them.
Deliver = Callable[[Any, "str | None"], None]


def worker_exception(stage: str, where: str, payload: tuple[Any, ...]) -> BaseException:
    """The exception a worker reported, as itself where it could be pickled (else a
    WorkerError with its type and message), carrying the worker's traceback text in
    ``traceback_text`` and in a note. ``where`` names the worker ("forked child process
    123", "Ray actor ...")."""
    pickled, type_name, message, text = payload
    loaded: Any = None
    if pickled is not None:
        try:
            loaded = pickle.loads(pickled)
        except Exception:  # noqa: BLE001 - reported as WorkerError instead
            loaded = None
    exc: BaseException
    if not isinstance(loaded, BaseException):
        exc = WorkerError(
            f"stage {stage!r}: {where} raised {type_name}: {message} (the exception could "
            "not be sent to the parent as itself)",
            traceback_text=text,
        )
    else:
        exc = loaded
        try:
            exc.traceback_text = text  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - e.g. __slots__ exceptions: the note remains
            pass
    exc.add_note(f"[minigun] raised in {where} of stage {stage!r}; its traceback:\n{text.rstrip()}")
    return exc


class ChunkReply:
    """What a worker has reported about the chunk ``items`` sent to it."""

    def __init__(self, stage: str, where: Callable[[], str], items: list[Any], deliver: Deliver):
        self.stage = stage
        #: Names the worker for error messages (asked only when an item failed).
        self.where = where
        self.items = items
        self._deliver = deliver
        self.pending: list[tuple[Any, Any]] = []
        #: Items reported finished, from the start of the chunk.
        self.finished = 0
        self.retries = 0
        self.failures: list[tuple[Any, BaseException]] = []

    def take(self, entries: list[tuple[Any, Any]]) -> None:
        """Read a frame's entries."""
        for to, data in entries:
            if to.__class__ is not int:
                self.pending.append((to, data))
            elif to == loop.MARK_FINISHED:
                self.deliver()
                self.finished = data + 1
            elif to == loop.MARK_RETRIED:
                self.retries += data
            else:
                k, payload = data
                self.failures.append(
                    (self.items[k], worker_exception(self.stage, self.where(), payload))
                )

    def deliver(self) -> None:
        """Send on the values of the item whose outcome arrived (or what close() emitted)."""
        values, self.pending = self.pending, []
        for target, value in values:
            self._deliver(value, target)


def read_reply(
    frames: Iterable[bytes],
    take: Callable[[list[tuple[Any, Any]]], None],
    exception: Callable[[tuple[Any, ...]], BaseException],
) -> tuple[str, BaseException | None]:
    """Hand the entries of a worker's reply frames to ``take`` until its last frame:
    ``("done" | "retired", None)``, ``("error" | "fatal", exception(payload))`` for a
    reply that failed as a whole, or ``("eof", None)`` when the frames end before the
    reply does (the worker is gone). The one reader of replies, whatever carried them: a
    child's pipe, a subinterpreter's, a Ray call's result."""
    for frame in frames:
        tag, data = pickle.loads(frame)
        del frame  # a large frame is freed before its values go downstream
        if tag in (loop.VALUES, loop.DONE, loop.RETIRED):
            take(data)
            del data
            if tag != loop.VALUES:
                return tag, None
        else:
            return tag, exception(data)
    return "eof", None


def _pickled(value: Any) -> bytes:
    return pickle.dumps(value, loop.PROTOCOL)


def split_picklable(
    stage: str,
    items: list[Any],
    destination: str,
    advice: str,
    dumps: Callable[[Any], bytes] = _pickled,
) -> tuple[list[Any], list[tuple[Any, BaseException]]]:
    """The items that can be pickled (by ``dumps``) to send them to ``destination`` ("a
    fork_ipc worker process"), and a WorkerError for each of the others, whose message
    ends with ``advice`` (what else the user can do)."""
    kept: list[Any] = []
    failures: list[tuple[Any, BaseException]] = []
    for item in items:
        try:
            dumps(item)
        except Exception as exc:  # noqa: BLE001
            kind = type(item)
            error = WorkerError(
                f"stage {stage!r}: an item of type {kind.__module__}.{kind.__qualname__} "
                f"cannot be pickled to send it to {destination} ({type(exc).__name__}: "
                f"{exc}); send picklable items, {advice}"
            )
            error.__cause__ = exc
            failures.append((item, error))
        else:
            kept.append(item)
    return kept, failures


def chunk_message(
    stage: str, items: list[Any], careful: bool, destination: str, advice: str
) -> tuple[bytes | None, list[Any], list[tuple[Any, BaseException]]]:
    """The message that sends the chunk ``items`` to a worker, the items it carries, and
    the failures of those it leaves out because they cannot be pickled (see
    :func:`split_picklable`); no message when none is left."""
    try:
        return _pickled((loop.CHUNK, (items, careful))), items, []
    except Exception:  # noqa: BLE001 - some item cannot be pickled: it alone fails
        kept, refused = split_picklable(stage, items, destination, advice)
        message = _pickled((loop.CHUNK, (kept, careful))) if kept else None
        return message, kept, refused
