"""The ``async`` strategy: stages written as ``async def`` functions or async generators.

An async processor runs on an event loop owned by the stage, on the stage's worker thread,
with up to ``concurrency=`` coroutines in flight (capped by the pipeline's
``max_concurrency``). The runtime hands the stage its items in chunks of at least
``concurrency`` items (when that many are waiting); the chunk's coroutines run
concurrently and each item's values are emitted when its coroutine completes (what an
attempt emits is held until its outcome is known, and dropped if it fails). Retries run on
the loop too (``await asyncio.sleep`` for the backoff); items that still fail go to
``on_error`` one by one.

Async producers and accumulator bodies have no concurrency to exploit: they are driven
step by step on a loop of their own, in their worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any

from . import context
from .config import RetryPolicy
from .graph import Node
from .plan import StagePlan
from .work import Run, StageCode, Work

#: What a chunk call returns: retries made, the items that failed with their exception,
#: and each item's latency (see minigun.work).
ChunkOutcome = tuple[int, list[tuple[Any, BaseException]], list[float]]

#: How often a chunk in flight checks whether the run is stopping.
_POLL = 0.05


def is_async(fn: Callable[..., Any] | None) -> bool:
    fn = inspect.unwrap(fn) if fn is not None else None
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


async def _body(fn: Callable[..., Any], item: Any) -> None:
    """Run the stage function on one item and emit what it produces (processor rules)."""
    if inspect.isasyncgenfunction(inspect.unwrap(fn)):
        async for value in fn(item):
            context.emit(value)
        return
    result = await fn(item)
    if result is not None:
        context.emit(result)


class _AsyncWorker:
    """The event loop of one async stage and the chunk call the runtime makes."""

    def __init__(
        self,
        fn: Callable[..., Any],
        concurrency: int,
        policy: RetryPolicy,
        stopping: Callable[[], bool],
    ) -> None:
        self.fn = fn
        self.concurrency = concurrency
        self.policy = policy
        self.stopping = stopping
        self.loop = asyncio.new_event_loop()

    def __call__(self, items: list[Any]) -> ChunkOutcome:
        try:
            return self.loop.run_until_complete(self._chunk(items))
        except BaseException:
            self.close()  # the run is stopping: the runtime will not call close()
            raise

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.close()

    async def _chunk(self, items: list[Any]) -> ChunkOutcome:
        slots = asyncio.Semaphore(self.concurrency)
        retries = 0
        failures: list[tuple[Any, BaseException]] = []
        # Each item's own time from its first attempt to its end: the coroutines of a
        # chunk overlap, so the chunk's time divided by its items is no item's latency.
        latencies: list[float] = []

        async def one(item: Any) -> None:
            async with slots:
                began = time.perf_counter()
                try:
                    await attempts(item)
                finally:
                    latencies.append(time.perf_counter() - began)

        async def attempts(item: Any) -> None:
            nonlocal retries
            attempt = 0
            while True:
                # Every attempt's emits wait for its outcome, retried or not.
                held = context.hold_emits()
                try:
                    await _body(self.fn, item)
                except Exception as exc:  # noqa: BLE001 - reported to the runtime
                    context.release_emits(held, keep=False)
                    if attempt < self.policy.retries and isinstance(exc, self.policy.retry_on):
                        attempt += 1
                        retries += 1
                        await asyncio.sleep(self.policy.delay(attempt))
                        continue
                    failures.append((item, exc))
                else:
                    context.release_emits(held, keep=True)
                return

        work = asyncio.gather(*(one(item) for item in items))
        while True:
            done, _ = await asyncio.wait([work], timeout=_POLL)
            if done:
                break
            if self.stopping():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                raise RuntimeError("the run is stopping")
        await work
        return retries, failures, latencies


def async_executor(run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work:
    """The ``async`` strategy's executor: each runtime worker thread (there is one) runs
    an event loop with ``plan.workers`` coroutines at a time, on the one worker it opened
    (a custom Stage's copy with an ``async def process``, or the async function)."""
    policy = RetryPolicy(node.stage, node.scope.settings)
    start = code.starter()

    def make_worker() -> tuple[Callable[[list[Any]], Any], Callable[[], None]]:
        process, close_worker = start()
        assert process is not None, "an async stage has a body"
        worker = _AsyncWorker(process, plan.workers, policy, lambda: run.stopping)

        def close() -> None:
            try:
                if close_worker is not None:
                    close_worker()
            finally:
                worker.close()

        return worker, close

    return Work(
        call=None, mode="chunk", make_worker=make_worker, threads=1, min_chunk=plan.min_chunk
    )


def drive_producer(fn: Callable[[], Any]) -> Callable[[], Any]:
    """A synchronous producer that runs an async producer on a loop of its own."""

    def produce() -> Any:
        loop = asyncio.new_event_loop()
        try:
            if inspect.isasyncgenfunction(inspect.unwrap(fn)):
                agen = fn()
                while True:
                    try:
                        yield loop.run_until_complete(agen.__anext__())
                    except StopAsyncIteration:
                        return
            result = loop.run_until_complete(fn())
            if result is not None:
                yield from result
        finally:
            loop.close()

    return produce


def drive_body(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A synchronous accumulator body that runs an async one (emits what it produces)."""

    def body(batch: Any) -> None:
        asyncio.run(_body(fn, batch))

    return body
