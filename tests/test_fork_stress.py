"""Fork stress: many runs that fork while other threads start, stop and print.

Every run has a spawn_thread stage (a thread, and a thread state, per item) beside a
spawn_fork and a fork_ipc stage, threads printing to stdout, and a second such run going in
another thread. A fork that met a half-made thread state (CPython 3.11) or a lock another
thread held (free-threaded builds) would leave a child hung, and the run with it.

Marked ``stress``: left out of the quick suite (``-m "not stress"``); scripts/test.sh runs
it with a bounded time. ``MINIGUN_STRESS_SECONDS`` (default 20) bounds each test's time.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

import pytest

import minigun as mg

pytestmark = [
    pytest.mark.stress,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    pytest.mark.timeout(600),
]

SECONDS = float(os.environ.get("MINIGUN_STRESS_SECONDS", "20"))
MAX_RUNS = 5000
#: A run of this pipeline takes well under a second; one still going after this is hung.
HANG = 30.0
ITEMS = 40


def mixed_pipeline(name: str) -> mg.Pipeline:
    p = mg.Pipeline(name, config={"max_processes": 2, "max_threads": 4})
    p.producer(lambda: range(ITEMS), name="numbers")

    @p.processor(strategy="spawn_thread", name="threads_per_item")
    def plus_one(x):
        if x % 16 == 0:
            print(f"spawned thread saw {x}", file=sys.__stdout__, flush=True)
        return x + 1

    p.accumulator(name="batch", max_size=8)

    @p.processor(strategy="spawn_fork", name="forked")
    def total(batch):
        print(f"child {os.getpid()} got {len(batch)} items", file=sys.__stdout__)
        return [x * 2 for x in batch]

    @p.processor(strategy="fork_ipc", processes=2, name="ipc")
    def spread(batch):
        for x in batch:
            mg.emit(x)

    p.consumer(lambda x: None, name="sink")

    @p.after_fork
    def report_stack_on_sigusr1():
        # For a hang report: the test sends SIGUSR1 to every child it finds.
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)

    return p


def dump_children() -> None:
    """Where each child of this process is: its kernel wait channel, and its Python stack
    (children that got as far as their after_fork hook print it on SIGUSR1)."""
    me = os.getpid()
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children") as f:
                pids = [int(pid) for pid in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/wchan") as f:
                    wchan = f.read()
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().split()[2]
                print(f"child {pid}: state {state}, wchan {wchan}", file=sys.__stderr__)
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                continue
    time.sleep(0.5)


EXPECTED_OUT = ITEMS  # values reaching the sink


def run_until(deadline: float, name: str, failures: list, counts: list) -> None:
    runs = 0
    while time.monotonic() < deadline and runs < MAX_RUNS and not failures:
        run = mixed_pipeline(name).start()
        try:
            result = run.wait(timeout=HANG)
        except TimeoutError:
            # Where every thread of this process is, for whoever reads the failure.
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
            dump_children()
            run.cancel()
            failures.append(f"{name}: run {runs} hung (stats: {run.stats})")
            return
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(f"{name}: run {runs} failed: {exc!r}")
            return
        if result.stats["sink"].items_in != EXPECTED_OUT:
            failures.append(f"{name}: run {runs} lost items: {result.stats['sink']}")
            return
        runs += 1
    counts.append(runs)


def chatter(stop: threading.Event) -> None:
    """A thread that keeps writing to stdout and stderr, as logging threads do. (The
    process's own streams, sys.__stdout__ and sys.__stderr__: pytest's capture replaces
    sys.stdout, and a child writing to a replaced stream that another thread held at the
    fork is outside what minigun can protect; see docs/forking.md.)"""
    n = 0
    while not stop.is_set():
        sys.__stdout__.write(f"chatter {n}\n")
        sys.__stderr__.write(f"chatter {n}\n")
        if n % 50 == 0:
            sys.__stdout__.flush()
        n += 1
        time.sleep(0.0005)


@pytest.mark.parametrize("concurrent_runs", [1, 2])
def test_runs_that_fork_beside_spawned_threads_and_other_runs_never_hang(concurrent_runs):
    deadline = time.monotonic() + SECONDS
    failures: list[str] = []
    counts: list[int] = []
    stop = threading.Event()
    talker = threading.Thread(target=chatter, args=(stop,), daemon=True)
    talker.start()
    runners = [
        threading.Thread(target=run_until, args=(deadline, f"stress{k}", failures, counts))
        for k in range(concurrent_runs)
    ]
    try:
        for t in runners:
            t.start()
        for t in runners:
            t.join(SECONDS + 2 * HANG)
    finally:
        stop.set()
        talker.join(5)
    assert not failures, failures
    assert all(not t.is_alive() for t in runners), "a runner thread is stuck"
    assert len(counts) == concurrent_runs and min(counts) > 0
    print(
        f"{sum(counts)} runs in {SECONDS:.0f} s, {concurrent_runs} at a time", file=sys.__stderr__
    )
