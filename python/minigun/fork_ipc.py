"""The ``fork_ipc`` executor: ``processes=N`` long-lived forked workers, one per Rust
worker thread of the stage, each forked lazily at its thread's first item.

Items travel in the runtime's chunks ("chunk" call mode): the parent pickles a chunk to its
worker, which runs it item by item with retries (``worker_loop.serve``) and streams back
values and per-item outcomes; an item's values are delivered when its outcome arrives. If
the worker dies mid-chunk, the items it had not reported go to a fresh worker in careful
mode (each item reported before the next starts): the item that kills it fails, the others
complete, and nothing is delivered twice.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from . import context
from . import worker_loop as loop
from .children import ForkStage, died_error, pump, spawn, with_hooks
from .children import kill as _kill
from .children import wait as _wait
from .config import RetryPolicy
from .fork_safety import CHILD_EXIT_OK, flush_child_streams
from .native import ext
from .worker_reply import ChunkReply, chunk_message


def _ipc_child(wfd: int, rfd: int, fn: ForkStage, start: loop.Start, policy: RetryPolicy) -> int:
    """A fork_ipc worker: answers chunks until the parent closes it (worker_loop.serve)."""
    out = loop.Outbox(
        loop.pipe_sender(wfd), fn.path, fn.routes, fn.route_error, before_reply=flush_child_streams
    )
    context.set_child_emitter(out.emit)
    loop.serve(loop.pipe_receiver(rfd), out, with_hooks(fn.after, start), fn.mode, policy)
    return CHILD_EXIT_OK


class _IpcWorker:
    """One Rust worker thread's long-lived child, forked at its first item."""

    def __init__(self, fn: ForkStage, start: loop.Start, policy: RetryPolicy):
        self.fn = fn
        self.start = start
        self.policy = policy
        self.child: Any = None

    def _start(self) -> Any:
        self.fn.ready()
        self.fn.check_stop()
        child = spawn(self.fn, 0, _ipc_child, (self.fn, self.start, self.policy), duplex=True)
        self.child = child
        return child

    def _reply(self, items: list[Any]) -> ChunkReply:
        def where() -> str:
            return f"forked child process {self.child.pid if self.child else 0}"

        return ChunkReply(self.fn.path, where, items, ext.emit)

    def _drop(self, kill: bool) -> None:
        child, self.child = self.child, None
        if child is not None:
            _kill(child) if kill else _wait(child)

    def _exchange(
        self, message: bytes, take: Callable[[list[tuple[Any, Any]]], None]
    ) -> tuple[str, Any]:
        """Send one message and collect the reply. A worker found dead before it could
        read the message (killed while idle) is replaced once, transparently."""
        for attempt in (1, 2):
            child = self.child
            if child is not None and child.exited():
                self._drop(kill=True)  # died while idle: reap it, fork a fresh one
                child = None
            child = child or self._start()
            delivered = True
            try:
                try:
                    child.write_frame(message)
                except BrokenPipeError:
                    delivered = False  # gone; its last frames (if any) say why
                try:
                    outcome, error = pump(child, take)
                except EOFError:  # the pipe ended inside a frame: it died mid-write
                    outcome, error = "eof", None
            except BaseException:
                # Stopping, or a value was refused downstream: the child may be mid-item.
                self._drop(kill=True)
                raise
            if outcome == "eof":
                self._drop(kill=True)
                if not delivered and attempt == 1:
                    continue
                return "error", died_error(child)
            if outcome in (loop.FATAL, loop.RETIRED):
                self._drop(kill=False)
            return outcome, error
        raise AssertionError("unreachable")

    def call(self, items: list[Any]) -> tuple[int, list[tuple[Any, BaseException]]] | None:
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
            message, kept, refused = chunk_message(
                self.fn.path,
                items[start:],
                careful,
                "a fork_ipc worker process",
                "or use strategy='spawn_fork' (its children read items without pickling) "
                "or 'threads'",
            )
            if refused:
                items, failures = items[:start] + kept, failures + refused
            if message is None:
                break
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

    def close(self) -> None:
        if self.child is None:
            return
        reply = self._reply([])
        outcome, error = self._exchange(pickle.dumps((loop.CLOSE, None), loop.PROTOCOL), reply.take)
        self._drop(kill=False)
        if error is not None:
            raise error
        reply.deliver()  # what close() emitted


def ipc_factory(
    fn: ForkStage, start: loop.Start, policy: RetryPolicy
) -> Callable[[], tuple[Any, Any]]:
    def make_ipc_worker() -> tuple[Callable[[list[Any]], Any], Callable[[], None]]:
        worker = _IpcWorker(fn, start, policy)
        return worker.call, worker.close

    return make_ipc_worker
