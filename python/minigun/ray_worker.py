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
    while :meth:`handle` works through a chunk: the chunk then ends before its next item,
    and the worker is closed before the parent kills the actor. The parent sends one
    message at a time, so nothing else runs concurrently."""

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


def run_item(job: WorkerJob, item: Any) -> tuple[list[bytes], list[bytes]]:
    """One item's worker, in a Ray task: the frames of the item's reply and of the
    worker's close (empty when the worker could not start)."""
    frames: list[bytes] = []
    out = loop.Outbox(frames.append, job.path, job.routes, job.route_error)
    context.set_child_emitter(out.emit)
    server = loop.ChunkServer(out, job.start, job.mode, job.policy)
    if not server.handle((loop.CHUNK, ([item], False))):
        server.abandoned()  # it could not start, or broke: close what was opened
        return list(frames), []
    item_frames = list(frames)
    frames.clear()
    server.handle((loop.CLOSE, None))
    return item_frames, list(frames)
