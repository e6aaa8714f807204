"""W2, I/O-bound on threads: N items that each sleep 2 ms, on 32 threads.

The ideal wall time is N * 2 ms / 32 (125 ms for 2,000 items); "x ideal" is how far each
implementation is from it. The "sleep floor" rows show how close the machine's own sleeps
let anything come: with the kernel's default timer slack (50 µs on Linux), and with the
1 µs that minigun's threads ask for.
"""

from __future__ import annotations

import ctypes
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from benchmarks.workload import Impl, Params, Workload, minigun_impl


def items(n: int) -> Iterator[int]:
    yield from range(n)


def make_io(seconds: float):  # type: ignore[no-untyped-def]
    def io(x: int) -> int:
        time.sleep(seconds)
        return x

    return io


def queue_threads(params: Params) -> int:
    n, workers, io = params["n"], params["threads"], make_io(params["sleep"])
    done = object()
    todo: queue.Queue[object] = queue.Queue(maxsize=1000)
    results: queue.Queue[object] = queue.Queue(maxsize=1000)
    total = 0

    def produce() -> None:
        for x in items(n):
            todo.put(x)
        for _ in range(workers):
            todo.put(done)

    def work() -> None:
        while (x := todo.get()) is not done:
            results.put(io(x))
        results.put(done)

    def consume() -> None:
        nonlocal total
        finished = 0
        while finished < workers:
            x = results.get()
            if x is done:
                finished += 1
            else:
                total += x  # type: ignore[operator]

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    threads += [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total


def thread_pool_executor(params: Params) -> int:
    with ThreadPoolExecutor(params["threads"]) as pool:
        return sum(pool.map(make_io(params["sleep"]), items(params["n"])))


def minigun(params: Params) -> int:
    import minigun as mg

    n, workers = params["n"], params["threads"]
    total = [0]
    p = mg.Pipeline("w2", config={"max_threads": workers})
    p.producer(lambda: items(n), name="items")
    p.processor(make_io(params["sleep"]), name="io", threads=workers)

    @p.consumer
    def add(x: int) -> None:
        total[0] += x

    p.run()
    return total[0]


def sleep_floor(params: Params) -> int:
    """Not a pipeline: each thread sleeps through its own share of the items, with no
    hand-off at all. Every sleep overshoots its 2 ms a little (timer slack, the wake-up,
    taking the GIL back), so this is the floor any implementation on the kernel's default
    timer slack stands on."""
    return _sleep_shares(params, timer_slack_ns=None)


def sleep_floor_tight(params: Params) -> int:
    """The sleep floor with each thread's timer slack at 1 µs, as minigun sets it on its
    own threads (Linux): the floor a minigun pipeline stands on."""
    return _sleep_shares(params, timer_slack_ns=1_000)


PR_SET_TIMERSLACK = 29


def _sleep_shares(params: Params, timer_slack_ns: int | None) -> int:
    n, workers, io = params["n"], params["threads"], make_io(params["sleep"])
    totals = [0] * workers

    def share(k: int) -> None:
        if timer_slack_ns is not None and sys.platform == "linux":
            ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(timer_slack_ns), 0, 0, 0)
        totals[k] = sum(io(x) for x in range(k, n, workers))

    threads = [threading.Thread(target=share, args=(k,)) for k in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(totals)


def pypeln_threads(params: Params) -> int:
    import pypeln as pl

    io = make_io(params["sleep"])
    return sum(pl.thread.map(io, items(params["n"]), workers=params["threads"], maxsize=1000))


def mpire_threads(params: Params) -> int:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=params["threads"], start_method="threading") as pool:
        return sum(pool.imap_unordered(make_io(params["sleep"]), items(params["n"])))


def pyper_threads(params: Params) -> int:
    from pyper import task

    io = make_io(params["sleep"])
    pipeline = task(items, branch=True) | task(io, workers=params["threads"]) > sum
    result: int = pipeline(params["n"])
    return result


def streamable_threads(params: Params) -> int:
    from streamable import stream

    io = make_io(params["sleep"])
    return sum(stream(items(params["n"])).map(io, concurrency=params["threads"]))


WORKLOADS = (
    Workload(
        key="W2",
        module=__name__,
        title="I/O-bound: N items sleeping 2 ms each, 32 threads",
        impls=(
            minigun_impl("minigun threads=32", minigun),
            Impl("queue.Queue + 32 threads", queue_threads),
            Impl("ThreadPoolExecutor(32).map", thread_pool_executor),
            Impl("sleep floor (no hand-off)", sleep_floor),
            Impl("sleep floor, 1 us timer slack", sleep_floor_tight),
            Impl("pypeln thread", pypeln_threads, requires="pypeln"),
            Impl("mpire threading", mpire_threads, requires="mpire"),
            Impl("pyper", pyper_threads, requires="pyper"),
            Impl("streamable", streamable_threads, requires="streamable"),
        ),
        subjects=("minigun threads=32",),
        full={"n": 2_000, "sleep": 0.002, "threads": 32},
        quick={"n": 160, "sleep": 0.002, "threads": 32},
        count=lambda params: params["n"],
        expected=lambda params: params["n"] * (params["n"] - 1) // 2,
        unit="s",
        ideal_seconds=lambda params, best: params["n"] * params["sleep"] / params["threads"],
    ),
)
