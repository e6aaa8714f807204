"""What runs on a Ray worker: a stage's job answering the parent, one remote call each.

A ``ray`` stage's actor is a :class:`StageActor` (the parent wraps the class with
``ray.remote``): it starts one worker of the stage when it is created and answers each
message (a chunk of items, or "close") with the frames of its reply, the same frames a
fork_ipc child writes to its pipe (:mod:`minigun.worker_loop`). A ``spawn_ray`` stage's
task is :func:`run_item`: a worker for one item, opened, given the item and closed.

So the item contract is the one every process boundary keeps, and what differs from a
forked worker is only the transport: a reply comes back whole, as the remote call's
result, rather than streamed.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from . import context
from . import worker_loop as loop
from .worker_job import WorkerJob

#: A message to a worker: ``(worker_loop.CHUNK, (items, careful))`` or ``(CLOSE, None)``.
Message = tuple[str, Any]


class StageActor:
    """One long-lived worker of a stage, in a Ray actor.

    The parent creates it with ``max_concurrency=2``, so that :meth:`abandon` can run
    while :meth:`handle` works through a chunk (the chunk then ends before its next item,
    and the worker is closed before the parent kills the actor). The parent sends its
    first message once the actor is up, and one message at a time, so nothing else runs
    concurrently."""

    def __init__(self, job: WorkerJob) -> None:
        self._job = job
        self._frames: list[bytes] = []
        self._stopping = threading.Event()
        self._busy = threading.Lock()
        self._server: loop.ChunkServer | None = None

    def _started(self) -> loop.ChunkServer:
        """The stage's worker, started at the first message (not when the actor is made:
        an actor killed before any message has opened nothing)."""
        if self._server is None:
            job = self._job
            out = loop.Outbox(self._frames.append, job.path, job.routes, job.route_error)
            # An actor has its process to itself: mg.emit there means this outbox.
            context.set_child_emitter(out.emit)
            self._server = loop.ChunkServer(
                out, job.start, job.mode, job.policy, self._stopping.is_set
            )
        return self._server

    def handle(self, message: Message) -> list[bytes]:
        """Answer one message: the frames of the reply (none once the run is stopping)."""
        with self._busy:
            if self._stopping.is_set():
                return []
            self._started().handle(message)
            frames = list(self._frames)
            self._frames.clear()
            return frames

    def abandon(self) -> None:
        """The run is stopping: leave the chunk in progress before its next item, then
        close the worker (no reply is read)."""
        self._stopping.set()
        with self._busy:
            if self._server is not None:
                self._server.abandoned()


class _CancelDeferred:
    """Ray cancels a running task by raising KeyboardInterrupt in its main thread (a
    simulated SIGINT). Within this block one is only noted (``cancelled``), so that
    opening or closing the worker is never cut in half: a worker that was opened is
    always closed. Off the main thread (where Ray never interrupts) it does nothing."""

    def __init__(self) -> None:
        self.cancelled = False
        self._previous: Any = None

    def _note(self, signum: int, frame: Any) -> None:
        self.cancelled = True

    def __enter__(self) -> _CancelDeferred:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run_item(job: WorkerJob, item: Any) -> tuple[list[bytes], list[bytes]]:
    """One item's worker, in a Ray task: the frames of the item's reply and of the
    worker's close (empty when the worker could not start).

    A cancel (the run is stopping) interrupts the item only; the worker is closed all the
    same. The parent no longer reads the reply then, so a cancelled task returns none."""
    frames: list[bytes] = []
    out = loop.Outbox(frames.append, job.path, job.routes, job.route_error)
    context.set_child_emitter(out.emit)
    with _CancelDeferred() as opening:
        server = loop.ChunkServer(out, job.start, job.mode, job.policy)
    served = False
    if not opening.cancelled:  # cancelled while opening: the item is not started
        try:
            served = server.handle((loop.CHUNK, ([item], False)))
        except KeyboardInterrupt:  # cancelled between the item and its reply
            pass
    with _CancelDeferred():
        if not served:
            server.abandoned()  # it could not start, broke or was cancelled: close it
            return list(frames), []
        item_frames = list(frames)
        frames.clear()
        server.handle((loop.CLOSE, None))
    return item_frames, list(frames)
