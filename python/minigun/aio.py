"""The ``async`` strategy: stages written as ``async def`` functions or async generators.

An async processor runs on an event loop owned by the stage, on the stage's worker thread,
with up to ``concurrency=`` coroutines in flight (capped by the pipeline's
``max_concurrency``) at every moment: a sliding window that a new item enters as soon as
any one leaves, across the chunks the runtime hands over (see :class:`_AsyncWorker`).
Each item's values are emitted when its coroutine completes (what an attempt emits is held
until its outcome is known, and dropped if it fails). Retries run on the loop too (``await
asyncio.sleep`` for the backoff) and hold only their own slot; items that still fail go
to ``on_error`` one by one.

Async producers and accumulator bodies have no concurrency to exploit: they are driven
step by step on a loop of their own, in their worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import context
from .callables import called_function, is_async_generator_function, unwrapped
from .config import RetryPolicy
from .graph import Node
from .plan import StagePlan
from .work import Run, StageCode, Work

if TYPE_CHECKING:
    import asyncio
else:
    from .lazy_import import asyncio

#: What a chunk call returns: retries made, the items that failed with their exception,
#: and each item's latency (see minigun.work).
ChunkOutcome = tuple[int, list[tuple[Any, BaseException]], list[float]]

#: How often the window checks whether the run is stopping; and, while a slot is free,
#: whether items wait in the stage's input.
_POLL = 0.05
_PEEK = 0.005


def _is_async_generator(fn: Callable[..., Any]) -> bool:
    """Whether a call of ``fn`` makes an async generator (rather than a coroutine)."""
    return is_async_generator_function(called_function(unwrapped(fn)))


async def _body(fn: Callable[..., Any], generates: bool, item: Any) -> None:
    """Run the stage function on one item and emit what it produces (processor rules);
    ``generates``: ``fn`` is an async generator (``_is_async_generator``, asked once)."""
    if generates:
        async for value in fn(item):
            context.emit(value)
        return
    result = await fn(item)
    if result is not None:
        context.emit(result)


class _AsyncWorker:
    """The event loop of one async stage: a sliding window of coroutines that outlives
    the chunk calls the runtime makes.

    A call starts a coroutine for each item of its chunk (at most ``concurrency`` run at
    once; the others wait for a slot) and runs the loop until nothing is in flight, or
    until a slot is free and more items wait in the stage's input: then it returns, the
    runtime hands over the next chunk at once, and the items still in flight go on in
    the next call. A new item therefore starts as soon as any one finishes, whatever
    chunk it came in; a slow or retried item holds back nothing but its own slot. A call
    reports what finished during it (retries, failures with their items, latencies),
    from any chunk. The loop never waits for input itself: it never holds items in
    flight while the runtime waits for the next chunk, so nothing stalls.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        concurrency: int,
        policy: RetryPolicy,
        stopping: Callable[[], bool],
        input_waiting: Callable[[], bool],
    ) -> None:
        self.fn = fn
        self.generates = _is_async_generator(fn)
        self.concurrency = concurrency
        self.policy = policy
        self.stopping = stopping
        self.input_waiting = input_waiting
        self.loop = asyncio.new_event_loop()
        self.slots = asyncio.Semaphore(concurrency)
        #: Items started and not finished (running, or waiting for a slot).
        self.in_flight: set[asyncio.Task[None]] = set()
        #: What the window awaits while items are in flight: resolved when one finishes
        #: (``_finished``) or when it should look at the run and its input again.
        self._wake: asyncio.Future[None] | None = None
        #: A BaseException that is not an Exception (KeyboardInterrupt, SystemExit) that
        #: escaped an item: it fails the call, as it would fail a threads worker.
        self._escaped: BaseException | None = None
        # What finished since the last call returned.
        self.retries = 0
        self.failures: list[tuple[Any, BaseException]] = []
        # Each item's own time from its first attempt to its end: the coroutines
        # overlap, so a call's time divided by its items is no item's latency.
        self.latencies: list[float] = []

    def __call__(self, items: list[Any]) -> ChunkOutcome:
        try:
            return self.loop.run_until_complete(self._window(items))
        except BaseException:
            self.close()  # the run is stopping: the runtime will not call close()
            raise

    def close(self) -> None:
        """Close the loop; what is still in flight (only when the run stops) is cancelled."""
        if self.loop.is_closed():
            return
        if self.in_flight:
            for task in self.in_flight:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*self.in_flight, return_exceptions=True))
        self.loop.close()

    async def _window(self, items: list[Any]) -> ChunkOutcome:
        for item in items:
            task = self.loop.create_task(self._one(item))
            self.in_flight.add(task)
            task.add_done_callback(self._finished)
        while self.in_flight:
            room = len(self.in_flight) < self.concurrency
            # With a slot free, look at the input often: a waiting item should start now.
            # One future per wait, resolved by the first item to finish or by the timer:
            # ``asyncio.wait`` would hook into and out of every task in flight each time.
            wake = self._wake = self.loop.create_future()
            timer = self.loop.call_later(_PEEK if room else _POLL, _resolve, wake)
            try:
                await wake
            finally:
                timer.cancel()
                self._wake = None
            if self._escaped is not None:
                raise self._escaped
            if self.stopping():
                raise RuntimeError("the run is stopping")  # close() cancels the rest
            if len(self.in_flight) < self.concurrency and self.input_waiting():
                break
        outcome = (self.retries, self.failures, self.latencies)
        self.retries, self.failures, self.latencies = 0, [], []
        return outcome

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._escaped = task.exception()  # only a non-Exception gets out of _attempts
        if self._wake is not None:
            _resolve(self._wake)

    async def _one(self, item: Any) -> None:
        async with self.slots:
            began = time.perf_counter()
            try:
                await self._attempts(item)
            finally:
                self.latencies.append(time.perf_counter() - began)

    async def _attempts(self, item: Any) -> None:
        attempt = 0
        while True:
            # Every attempt's emits wait for its outcome, retried or not.
            held = context.hold_emits()
            try:
                await _body(self.fn, self.generates, item)
            except Exception as exc:  # noqa: BLE001 - reported to the runtime
                context.release_emits(held, keep=False)
                if attempt < self.policy.retries and isinstance(exc, self.policy.retry_on):
                    attempt += 1
                    self.retries += 1
                    await asyncio.sleep(self.policy.delay(attempt))
                    continue
                self.failures.append((item, exc))
            else:
                context.release_emits(held, keep=True)
            return


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def async_executor(run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work:
    """The ``async`` strategy's executor: each runtime worker thread (there is one) runs
    an event loop with ``plan.workers`` coroutines at a time, on the one worker it opened
    (a custom Stage's copy with an ``async def process``, or the async function)."""
    policy = RetryPolicy(node.stage, node.scope.settings)
    start = code.starter()

    def make_worker() -> tuple[Callable[[list[Any]], Any], Callable[[], None]]:
        process, close_worker = start()
        assert process is not None, "an async stage has a body"
        worker = _AsyncWorker(
            process, plan.workers, policy, lambda: run.stopping, lambda: run.input_waiting(node)
        )

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
            if _is_async_generator(fn):
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

    generates = _is_async_generator(fn)

    def body(batch: Any) -> None:
        asyncio.run(_body(fn, generates, batch))

    return body
