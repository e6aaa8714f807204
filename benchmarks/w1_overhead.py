"""W1, per-item overhead: N small ints, producer -> ``x * 2`` -> summing consumer.

Every implementation runs the same three functions; the plain loop is the GIL-bound limit.
Each implementation imports what it uses inside its function (minigun and the peers
alike), so a baseline's peak RSS does not include minigun's, nor minigun's a peer's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from benchmarks.workload import Impl, Params, Workload, minigun_impl


def numbers(n: int) -> Iterator[int]:
    yield from range(n)


def double(x: int) -> int:
    return x * 2


class Sum:
    def __init__(self) -> None:
        self.total = 0

    def __call__(self, x: int) -> None:
        self.total += x


#: The two queue types the hand-written baselines use.
_Queue = queue.Queue[object] | queue.SimpleQueue[object]


def plain_loop(params: Params) -> int:
    total = Sum()
    for x in numbers(params["n"]):
        total(double(x))
    return total.total


def queue_threads(params: Params) -> int:
    """One thread per stage, bounded queue.Queue between them (what users hand-write)."""
    return _three_threads(params["n"], queue.Queue(maxsize=1000), queue.Queue(maxsize=1000))


def simple_queue_threads(params: Params) -> int:
    """The same with unbounded queue.SimpleQueue (faster, but memory is not bounded)."""
    return _three_threads(params["n"], queue.SimpleQueue(), queue.SimpleQueue())


def _three_threads(n: int, to_double: _Queue, to_sum: _Queue) -> int:
    """producer -> x*2 -> summing consumer, one thread each, over the queues given."""
    done = object()
    total = Sum()

    def produce() -> None:
        for x in numbers(n):
            to_double.put(x)
        to_double.put(done)

    def process() -> None:
        while (x := to_double.get()) is not done:
            to_sum.put(double(x))  # type: ignore[arg-type]
        to_sum.put(done)

    def consume() -> None:
        while (x := to_sum.get()) is not done:
            total(x)  # type: ignore[arg-type]

    threads = [threading.Thread(target=f) for f in (produce, process, consume)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total.total


def minigun(params: Params) -> int:
    return _minigun(params)


def minigun_inline(params: Params) -> int:
    """Both stages ``inline``: they run on the producer's thread, one item at a time, as
    streamable's inline ``.map`` runs its stages."""
    inline = {"strategy": "inline"}
    return _minigun(params, processor=inline, consumer=inline)


def _minigun(
    params: Params,
    processor: dict[str, object] | None = None,
    consumer: dict[str, object] | None = None,
) -> int:
    import minigun as mg

    n = params["n"]
    total = Sum()
    p = mg.Pipeline("w1")
    p.producer(lambda: numbers(n), name="numbers")
    p.processor(double, **(processor or {}))
    p.consumer(total, name="sum", **(consumer or {}))
    p.run()
    return total.total


def minigun_elsewhere(strategy: str) -> Impl:
    """The same stage in one worker process or subinterpreter: what crossing costs."""

    def run(params: Params) -> int:
        return _minigun(params, processor={"strategy": strategy})

    return minigun_impl(f"minigun {strategy}", run, processes=strategy == "fork_ipc")


def pypeln_threads(params: Params) -> int:
    import pypeln as pl

    total = Sum()
    for x in pl.thread.map(double, numbers(params["n"]), workers=1, maxsize=1000):
        total(x)
    return total.total


def pyper_threads(params: Params) -> int:
    from pyper import task

    def consume(doubled: Iterator[int]) -> int:
        total = Sum()
        for x in doubled:
            total(x)
        return total.total

    pipeline = task(numbers, branch=True) | task(double) > consume
    result: int = pipeline(params["n"])
    return result


def streamable_inline(params: Params) -> int:
    from streamable import stream

    total = Sum()
    for x in stream(numbers(params["n"])).map(double):
        total(x)
    return total.total


def bytewax_dataflow(params: Params) -> int:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import TestingSource, run_main

    total = Sum()

    class SumPartition(StatelessSinkPartition[int]):
        def write_batch(self, items: list[int]) -> None:
            for x in items:
                total(x)

    class SumSink(DynamicSink[int]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> SumPartition:
            return SumPartition()

    flow = Dataflow("w1")
    # Source batches of 1,000: bytewax's per-batch cost is what it is built around.
    doubled = op.map(
        "double",
        op.input("numbers", flow, TestingSource(numbers(params["n"]), batch_size=1000)),
        double,
    )
    op.output("sum", doubled, SumSink())
    run_main(flow)
    return total.total


WORKLOADS = (
    Workload(
        key="W1",
        module=__name__,
        title="per-item overhead: N ints, producer -> x*2 -> summing consumer",
        impls=(
            minigun_impl("minigun", minigun),
            minigun_impl("minigun inline", minigun_inline),
            minigun_elsewhere("fork_ipc"),
            minigun_elsewhere("interpreters"),
            Impl("plain loop", plain_loop),
            Impl("queue.Queue + threads", queue_threads),
            Impl("SimpleQueue + threads", simple_queue_threads),
            Impl("pypeln thread", pypeln_threads, requires="pypeln"),
            Impl("pyper", pyper_threads, requires="pyper"),
            Impl("streamable inline", streamable_inline, requires="streamable"),
            Impl(
                "bytewax",
                bytewax_dataflow,
                requires="bytewax",
                imports=("bytewax.dataflow", "bytewax.operators", "bytewax.testing"),
            ),
        ),
        subjects=("minigun", "minigun inline"),
        full={"n": 1_000_000},
        quick={"n": 1_000},
        count=lambda params: params["n"],
        expected=lambda params: params["n"] * (params["n"] - 1),
    ),
)
