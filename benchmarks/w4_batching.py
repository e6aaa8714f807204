"""W4, batching: N records ``(f"user-{i:08d}", i)`` -> batches of 1,000 -> consumer.

The consumer counts the records of each batch; making the records is part of every
implementation's time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from benchmarks.workload import Impl, Params, Workload, minigun_impl

Record = tuple[str, int]


def records(n: int) -> Iterator[Record]:
    for i in range(n):
        yield (f"user-{i:08d}", i)


class Count:
    def __init__(self) -> None:
        self.total = 0

    def __call__(self, batch: list[Record]) -> None:
        self.total += len(batch)


def plain_loop(params: Params) -> int:
    size, count = params["batch"], Count()
    batch: list[Record] = []
    for record in records(params["n"]):
        batch.append(record)
        if len(batch) == size:
            count(batch)
            batch = []
    if batch:
        count(batch)
    return count.total


def queue_threads(params: Params) -> int:
    """Producer, batching and consumer threads between two queue.Queues."""
    n, size, count = params["n"], params["batch"], Count()
    done = object()
    to_batch: queue.Queue[object] = queue.Queue(maxsize=1000)
    to_consume: queue.Queue[object] = queue.Queue(maxsize=10)

    def produce() -> None:
        for record in records(n):
            to_batch.put(record)
        to_batch.put(done)

    def batcher() -> None:
        batch: list[object] = []
        while (record := to_batch.get()) is not done:
            batch.append(record)
            if len(batch) == size:
                to_consume.put(batch)
                batch = []
        if batch:
            to_consume.put(batch)
        to_consume.put(done)

    def consume() -> None:
        while (batch := to_consume.get()) is not done:
            count(batch)  # type: ignore[arg-type]

    threads = [threading.Thread(target=f) for f in (produce, batcher, consume)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count.total


def minigun(params: Params) -> int:
    import minigun as mg

    n, count = params["n"], Count()
    p = mg.Pipeline("w4")
    p.producer(lambda: records(n), name="records")
    p.accumulator(name="batch", max_size=params["batch"])
    p.consumer(count, name="count")
    p.run()
    return count.total


def streamable_group(params: Params) -> int:
    from streamable import stream

    count = Count()
    for batch in stream(records(params["n"])).group(params["batch"]):
        count(batch)
    return count.total


def streamable_group_buffered(params: Params) -> int:
    """.group then .buffer: the batches are made on a background thread, as a pipeline."""
    from streamable import stream

    count = Count()
    for batch in stream(records(params["n"])).group(params["batch"]).buffer(10):
        count(batch)
    return count.total


WORKLOADS = (
    Workload(
        key="W4",
        module=__name__,
        title="batching: N records -> batches of 1,000 -> consumer",
        impls=(
            minigun_impl("minigun accumulator", minigun),
            Impl("plain loop", plain_loop),
            Impl("queue.Queue + batching thread", queue_threads),
            Impl("streamable .group inline", streamable_group, requires="streamable"),
            Impl("streamable .group.buffer", streamable_group_buffered, requires="streamable"),
        ),
        subjects=("minigun accumulator",),
        full={"n": 1_000_000, "batch": 1000},
        quick={"n": 1_000, "batch": 100},
        count=lambda params: params["n"],
        expected=lambda params: params["n"],
    ),
)
