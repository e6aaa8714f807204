"""The ``spawn_fork`` executor: a forked child per item, which reads the item through
copy-on-write memory (it is never pickled).

Each child is the stage's worker for its one item: it runs the after_fork hooks, opens the
worker (a custom Stage's ``open()``), tries the item up to ``retries + 1`` times
(``worker_loop.run_one``: a failed attempt's emits are discarded, the back-off is slept in
the child), closes the worker (so what ``close()`` emits is delivered once, whatever the
item did) and reports the item's outcome. The parent forwards the child's values as they
arrive (the child sends only what it will not take back) and hands the runtime the item's
outcome and retry count, in the runtime's "chunk" call mode.

A child that dies before it finished its item (a signal, ``os._exit``, a crash), or that
failed before or after the item's attempts without sending anything (an ``after_fork``
hook or ``open()`` raised, a result could not be pickled), used up one attempt: if the
error matches ``retry_on`` and attempts are left, a fresh child gets the rest of them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from . import context
from . import worker_loop as loop
from .children import (
    ForkStage,
    child_exception,
    count_items,
    died_error,
    kill,
    pump,
    spawn,
    wait,
    with_hooks,
)
from .config import RetryPolicy
from .fork_safety import CHILD_EXIT_OK, flush_child_streams
from .native import ext


def _spawn_child(
    wfd: int, stage: ForkStage, start: loop.Start, policy: RetryPolicy, item: Any
) -> int:
    """A spawn_fork child: the worker for one item (see worker_loop.run_one)."""
    out = loop.Outbox(
        loop.pipe_sender(wfd),
        stage.path,
        stage.routes,
        stage.route_error,
        deliver=stage.send_back,
        streaming=True,
        before_reply=flush_child_streams,
    )
    context.set_child_emitter(out.emit)
    loop.run_one(with_hooks(stage.after, start), stage.mode, item, out, policy)
    return CHILD_EXIT_OK


class _ItemReply:
    """What one child reported about its item: values are forwarded as they come."""

    def __init__(self, stage: ForkStage, emit: Callable[[Any, Any], None]) -> None:
        self.stage = stage
        self.emit = emit
        self.pid = 0
        self.retries = 0
        self.forwarded = 0
        self.finished = False
        self.failed: BaseException | None = None

    def take(self, entries: list[tuple[Any, Any]]) -> None:
        for to, data in entries:
            if to.__class__ is not int:
                self.emit(data, to)
                self.forwarded += 1
            elif to == loop.MARK_RETRIED:
                self.retries += data
            elif to == loop.MARK_FAILED:
                self.failed = child_exception(self.stage.path, self.pid, data[1])
            elif to == loop.MARK_FINISHED:
                self.finished = True


def _one_child(
    stage: ForkStage, start: loop.Start, policy: RetryPolicy, item: Any, reply: _ItemReply
) -> BaseException | None:
    """Fork the child for ``item`` (in the budget), read its reply, reap it: the error the
    child reported outside its item's attempts, or of its death (None: it finished)."""
    stage.table.acquire(stage.path, stage.scopes)
    try:
        stage.check_stop()
        child = spawn(stage, count_items(item), _spawn_child, (stage, start, policy, item), False)
        reply.pid = child.pid
        try:
            try:
                outcome, error = pump(child, reply.take)
            except EOFError:  # the pipe ended inside a frame: the child died mid-write
                outcome, error = "eof", None
            wait(child)
        except BaseException:
            kill(child)
            raise
    finally:
        stage.table.release(stage.path, stage.scopes)
    if outcome == "eof":
        return died_error(child)
    failure: BaseException | None = error
    return failure


def _run_item(
    stage: ForkStage, start: loop.Start, item: Any, emit: Callable[[Any, Any], None]
) -> tuple[int, BaseException | None]:
    """Run one item in its child (a fresh one for attempts a dead child left over):
    ``(retries, the item's error or None)``."""
    policy = stage.policy
    retries = 0
    attempts = 0  # made by children that are gone
    while True:
        left = copy.copy(policy)
        left.retries = policy.retries - attempts
        reply = _ItemReply(stage, emit)
        try:
            error = _one_child(stage, start, left, item, reply)
        except ext.RunStopping:
            raise
        except Exception as exc:  # noqa: BLE001 - a before_fork hook: this item's error
            error = exc
        retries += reply.retries
        if reply.failed is not None:
            return retries, reply.failed  # failed its last attempt in the child
        if error is None:
            return retries, None
        attempts += reply.retries + 1
        # Whatever the child sent was delivered: run again only a child that sent nothing.
        again = not reply.finished and not reply.forwarded and attempts <= policy.retries
        if not (again and isinstance(error, policy.retry_on)):
            return retries, error
        retries += 1
        stage.table.pause(stage.path, policy.delay(attempts))


def spawn_fork_call(stage: ForkStage, start: loop.Start) -> Callable[[list[Any]], Any]:
    """The call a spawn_fork stage's worker threads make per chunk (the runtime's "chunk"
    mode): each item in a child of its own; returns ``(retries, [(item, error), ...],
    [seconds per item, ...])``."""
    emit = ext.emit

    def spawn_fork(items: list[Any]) -> tuple[int, list[tuple[Any, BaseException]], list[float]]:
        stage.ready()
        retries = 0
        failures: list[tuple[Any, BaseException]] = []
        latencies: list[float] = []
        for item in items:
            stage.check_stop()  # a stop check between items
            began = time.perf_counter()
            retried, error = _run_item(stage, start, item, emit)
            retries += retried
            if error is not None:
                failures.append((item, error))
            latencies.append(time.perf_counter() - began)
        return retries, failures, latencies

    spawn_fork.__qualname__ = f"spawn_fork[{stage.path}]"
    return spawn_fork
