"""Throughput: 1,000,000 small ints through producer -> x*2 -> summing consumer.

Runs, in one process and one run, side by side:
  (a) a plain Python loop calling the same three functions (the GIL-bound limit),
  (b) hand-written queue.Queue + one thread per stage,
  (c) minigun (builder API, one thread per stage).
Prints items/s and ratios. Usage: python benchmarks/throughput.py [N]
"""

from __future__ import annotations

import queue
import sys
import threading
import time

import minigun as mg

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000


def numbers(n: int):
    yield from range(n)


def double(x: int) -> int:
    return x * 2


class Sum:
    def __init__(self) -> None:
        self.total = 0

    def __call__(self, x: int) -> None:
        self.total += x


def plain_loop(n: int) -> int:
    acc = Sum()
    for x in numbers(n):
        acc(double(x))
    return acc.total


def queue_threads(n: int) -> int:
    done = object()
    q1: queue.Queue = queue.Queue(maxsize=1000)
    q2: queue.Queue = queue.Queue(maxsize=1000)
    acc = Sum()

    def produce() -> None:
        for x in numbers(n):
            q1.put(x)
        q1.put(done)

    def process() -> None:
        while (x := q1.get()) is not done:
            q2.put(double(x))
        q2.put(done)

    def consume() -> None:
        while (x := q2.get()) is not done:
            acc(x)

    threads = [threading.Thread(target=f) for f in (produce, process, consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return acc.total


def minigun(n: int) -> int:
    acc = Sum()
    p = mg.Pipeline("bench")
    p.producer(lambda: numbers(n), name="numbers")
    p.processor(double)
    p.consumer(acc, name="sum")
    p.run()
    return acc.total


def timed(fn, n: int) -> tuple[float, int]:
    start = time.perf_counter()
    total = fn(n)
    return time.perf_counter() - start, total


def main() -> None:
    expected = n_sum = N * (N - 1)
    results = {}
    for name, fn in [
        ("plain loop", plain_loop),
        ("queue.Queue+threads", queue_threads),
        ("minigun", minigun),
    ]:
        seconds, total = timed(fn, N)
        assert total == expected, (name, total, n_sum)
        results[name] = N / seconds
    base = results["queue.Queue+threads"]
    gil = "off" if not getattr(sys, "_is_gil_enabled", lambda: True)() else "on"
    print(f"{N:,} items, Python {sys.version.split()[0]} (GIL {gil})")
    for name, rate in results.items():
        print(f"  {name:<22} {rate / 1e6:8.2f} M items/s  {rate / base:6.2f}x queue.Queue")


if __name__ == "__main__":
    main()
