"""CPU-bound work: threads vs spawn_fork vs fork_ipc vs multiprocessing.Pool.

Each item costs about 10 ms of pure-Python arithmetic (the loop length is calibrated on
this machine first); 400 items travel in batches of 20. Runs, one after the other in one
process:

  serial      a plain loop in one process (the 1-core reference)
  threads     minigun, accumulator(20) -> processor(threads=N) (GIL-bound)
  spawn_fork  minigun, accumulator(20) -> processor(strategy="spawn_fork"): a child per batch
  fork_ipc    minigun, accumulator(20) -> processor(strategy="fork_ipc", processes=N)
  mp.Pool     multiprocessing.Pool(N, fork context).imap(work, items, chunksize=20),
              pool start-up included

with N = the number of CPUs (max_processes = N). Prints wall times, the speed-up over
serial and each time relative to the ideal (serial / N) and to mp.Pool.

Usage: python benchmarks/cpu_bound.py [ITEMS] [BATCH] [MS_PER_ITEM] [CPUS]
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import minigun as mg

ITEMS = int(sys.argv[1]) if len(sys.argv) > 1 else 400
BATCH = int(sys.argv[2]) if len(sys.argv) > 2 else 20
MS = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
CPUS = (
    int(sys.argv[4])
    if len(sys.argv) > 4
    else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
)

LOOPS = 1000  # calibrated in main()


def work(x: int) -> int:
    """About MS milliseconds of pure-Python integer arithmetic."""
    acc = x
    for i in range(LOOPS):
        acc = (acc * 31 + i) % 1_000_003
    return acc


def calibrate() -> int:
    global LOOPS
    LOOPS = 20_000
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        work(1)
        best = min(best, time.perf_counter() - t)
    LOOPS = max(1, int(LOOPS * (MS / 1000) / best))
    return LOOPS


def serial() -> int:
    return sum(work(x) for x in range(ITEMS))


def minigun_job(strategy: str) -> int:
    total = [0]
    p = mg.Pipeline(f"cpu-{strategy}", config={"max_processes": CPUS, "max_threads": CPUS})

    @p.producer
    def numbers():
        yield from range(ITEMS)

    p.accumulator(name="batch", max_size=BATCH)

    options = {"threads": CPUS} if strategy == "threads" else {}
    if strategy == "fork_ipc":
        options = {"processes": CPUS}

    @p.processor(strategy=strategy, **options)
    def crunch(items):
        return sum(work(x) for x in items)

    @p.consumer
    def add(s):
        total[0] += s

    p.run()
    return total[0]


def pool_imap() -> int:
    with multiprocessing.get_context("fork").Pool(CPUS) as pool:
        return sum(pool.imap(work, range(ITEMS), chunksize=BATCH))


def main() -> None:
    loops = calibrate()
    print(
        f"cpu_bound: {ITEMS} items x ~{MS:g} ms ({loops:,} loop iterations each), "
        f"batches of {BATCH}, {CPUS} CPU(s), Python {sys.version.split()[0]}"
        + (" free-threaded" if not getattr(sys, "_is_gil_enabled", lambda: True)() else "")
    )
    runs = [
        ("serial", serial),
        ("threads", lambda: minigun_job("threads")),
        ("spawn_fork", lambda: minigun_job("spawn_fork")),
        ("fork_ipc", lambda: minigun_job("fork_ipc")),
        ("mp.Pool.imap", pool_imap),
    ]
    times: dict[str, float] = {}
    expected = None
    for name, fn in runs:
        t = time.perf_counter()
        got = fn()
        times[name] = time.perf_counter() - t
        if expected is None:
            expected = got
        assert got == expected, f"{name} computed {got}, expected {expected}"
    ideal = times["serial"] / CPUS
    pool = times["mp.Pool.imap"]
    print(f"\n{'run':<14}{'wall s':>8}{'speed-up':>10}{'/ ideal':>9}{'/ Pool':>8}")
    for name, took in times.items():
        print(
            f"{name:<14}{took:>8.3f}{times['serial'] / took:>9.2f}x"
            f"{took / ideal:>9.2f}{took / pool:>8.2f}"
        )
    print(f"\nideal ({CPUS} CPUs): {ideal:.3f} s; '/ ideal' 1.15 = 15% slower than ideal")


if __name__ == "__main__":
    main()
