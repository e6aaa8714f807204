"""W2-async: N items doing ``await asyncio.sleep(0.002)``, 32 coroutines in flight.

Two workloads: W2-async, where every item succeeds, and W2-async-retry, where every tenth
item fails once (after its sleep, as a request that times out would) and is retried at
once: minigun with ``retries=1, retry_backoff=0``, the baselines with a retry loop around
the call. The ideal wall time is the number of attempts * 2 ms / 32.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from benchmarks.workload import Impl, Params, Workload, minigun_impl


class Flaky(Exception):
    """The failure of an item's first attempt."""


def make_fetch(params: Params) -> Callable[[int], Awaitable[int]]:
    """One attempt at one item; with ``fail_every``, every such item fails its first try."""
    sleep, fail_every = params["sleep"], params["fail_every"]
    failed: set[int] = set()

    async def fetch(x: int) -> int:
        await asyncio.sleep(sleep)
        if fail_every and x % fail_every == 0 and x not in failed:
            failed.add(x)
            raise Flaky(x)
        return x

    return fetch


def with_retry(fetch: Callable[[int], Awaitable[int]]) -> Callable[[int], Awaitable[int]]:
    """What a baseline writes by hand: one immediate retry."""

    async def fetch_retried(x: int) -> int:
        try:
            return await fetch(x)
        except Flaky:
            return await fetch(x)

    return fetch_retried


def items(n: int) -> Iterator[int]:
    yield from range(n)


async def aitems(n: int) -> AsyncIterator[int]:
    for x in range(n):
        yield x


def semaphore_gather(params: Params) -> int:
    fetch = with_retry(make_fetch(params))

    async def main() -> int:
        limit = asyncio.Semaphore(params["concurrency"])

        async def one(x: int) -> int:
            async with limit:
                return await fetch(x)

        return sum(await asyncio.gather(*(one(x) for x in items(params["n"]))))

    return asyncio.run(main())


def minigun(params: Params) -> int:
    import minigun as mg

    n = params["n"]
    total = [0]
    p = mg.Pipeline("w2-async", config={"max_concurrency": params["concurrency"]})
    p.producer(lambda: items(n), name="items")
    p.processor(
        make_fetch(params),
        name="fetch",
        concurrency=params["concurrency"],
        retries=1 if params["fail_every"] else 0,
        retry_backoff=0,
    )

    @p.consumer
    def add(x: int) -> None:
        total[0] += x

    p.run()
    return total[0]


def aiostream_map(params: Params) -> int:
    from aiostream import pipe, stream

    fetch = with_retry(make_fetch(params))

    async def main() -> int:
        fetched = stream.iterate(items(params["n"])) | pipe.map(
            fetch, task_limit=params["concurrency"]
        )
        total = 0
        async with fetched.stream() as results:
            async for x in results:
                total += x
        return total

    return asyncio.run(main())


def pypeln_task(params: Params) -> int:
    import pypeln as pl

    fetch = with_retry(make_fetch(params))
    return sum(pl.task.map(fetch, items(params["n"]), workers=params["concurrency"]))


def streamable_async(params: Params) -> int:
    from streamable import stream

    fetch = with_retry(make_fetch(params))
    return sum(stream(items(params["n"])).map(fetch, concurrency=params["concurrency"]))


def pyper_async(params: Params) -> int:
    from pyper import task

    fetch = with_retry(make_fetch(params))

    async def add_up(fetched: AsyncIterator[int]) -> int:
        total = 0
        async for x in fetched:
            total += x
        return total

    pipeline = task(aitems, branch=True) | task(fetch, workers=params["concurrency"]) > add_up
    result: int = asyncio.run(pipeline(params["n"]))
    return result


def _attempts(params: Params) -> int:
    n, every = params["n"], params["fail_every"]
    return int(n + (len(range(0, n, every)) if every else 0))


def _workload(key: str, title: str, fail_every: int) -> Workload:
    return Workload(
        key=key,
        module=__name__,
        title=title,
        impls=(
            minigun_impl("minigun concurrency=32", minigun),
            Impl("Semaphore + gather", semaphore_gather),
            Impl("aiostream", aiostream_map, requires="aiostream"),
            Impl("pypeln task", pypeln_task, requires="pypeln"),
            Impl("streamable", streamable_async, requires="streamable"),
            Impl("pyper", pyper_async, requires="pyper"),
        ),
        subjects=("minigun concurrency=32",),
        full={"n": 2_000, "sleep": 0.002, "concurrency": 32, "fail_every": fail_every},
        quick={"n": 160, "sleep": 0.002, "concurrency": 32, "fail_every": fail_every},
        count=lambda params: params["n"],
        expected=lambda params: params["n"] * (params["n"] - 1) // 2,
        unit="s",
        ideal_seconds=lambda params, best: (
            _attempts(params) * params["sleep"] / params["concurrency"]
        ),
    )


WORKLOADS = (
    _workload("W2-async", "async I/O: N items awaiting asyncio.sleep(0.002), concurrency 32", 0),
    _workload(
        "W2-async-retry",
        "async I/O as W2-async, every 10th item failing once and retried (no back-off)",
        10,
    ),
)
