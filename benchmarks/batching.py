"""Batching: 1,000,000 items -> batches of 1000 -> consumer.

Side by side in one run (each approach in its own child process, so each peak RSS is its
own): hand-written queue.Queue + threads with a list-batching loop, and minigun's
accumulator. Prints items/s, the ratio and each peak RSS.
Usage: python benchmarks/batching.py [N]
"""

from __future__ import annotations

import subprocess
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000

COMMON = """
import resource, sys, time
N = int(sys.argv[1])
def records():
    for i in range(N):
        yield ("user-%08d" % i, i)
total = 0
def consume(batch):
    global total
    total += len(batch)
"""

QUEUE = (
    COMMON
    + """
import queue, threading
done = object()
q_items, q_batches = queue.Queue(maxsize=1000), queue.Queue(maxsize=10)
def produce():
    for r in records():
        q_items.put(r)
    q_items.put(done)
def batch():
    buf = []
    while (r := q_items.get()) is not done:
        buf.append(r)
        if len(buf) == 1000:
            q_batches.put(buf)
            buf = []
    if buf:
        q_batches.put(buf)
    q_batches.put(done)
def sink():
    while (b := q_batches.get()) is not done:
        consume(b)
start = time.perf_counter()
threads = [threading.Thread(target=f) for f in (produce, batch, sink)]
for t in threads: t.start()
for t in threads: t.join()
"""
)

MINIGUN = (
    COMMON
    + """
import minigun as mg
p = mg.Pipeline("batching")
p.producer(records)
p.accumulator(name="batch", max_size=1000)
p.consumer(consume)
start = time.perf_counter()
p.run()
"""
)

REPORT = """
seconds = time.perf_counter() - start
assert total == N, total
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(code: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", code + REPORT, str(N)], check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[0]), int(out[1]) / 1024


def main() -> None:
    results = {"queue.Queue+batching": measure(QUEUE), "minigun accumulator": measure(MINIGUN)}
    base = N / results["queue.Queue+batching"][0]
    gil = "off" if not getattr(sys, "_is_gil_enabled", lambda: True)() else "on"
    print(f"{N:,} items in batches of 1000, Python {sys.version.split()[0]} (GIL {gil})")
    for name, (seconds, rss_mib) in results.items():
        rate = N / seconds
        print(
            f"  {name:<22} {rate / 1e6:6.2f} M items/s  {rate / base:5.2f}x queue.Queue"
            f"  peak RSS {rss_mib:6.1f} MiB"
        )


if __name__ == "__main__":
    main()
