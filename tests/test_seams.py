"""Regression tests for defects found where strategies, stage forms and concurrent runs
meet (in-process side). Each one failed before its fix."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest
from _mg_helpers import Collector, emits_then_fails, yields_then_fails

import minigun as mg


class Doubler(mg.Stage):
    def process(self, item):
        return item * 2


def test_custom_stage_with_spawn_thread_processes_every_item():
    out = Collector()
    p = mg.Pipeline("p")
    p.producer(lambda: range(100), name="numbers")
    p.add(Doubler("double", strategy="spawn_thread"))
    p.consumer(out.add, name="sink")
    result = p.run()
    assert sorted(out.items) == [2 * i for i in range(100)]
    assert result.stats["double"].items_in == 100
    assert result.stats["double"].items_out == 100


def test_custom_stage_with_spawn_thread_opens_and_closes_once_per_thread():
    events = Collector()

    class Tracked(mg.Stage):
        def open(self):
            self.seen = []
            events.add(("open", threading.get_ident()))

        def process(self, item):
            self.seen.append(item)

        def close(self):
            events.add(("close", threading.get_ident()))
            for item in self.seen:
                self.emit(item + 1)

    out = Collector()
    p = mg.Pipeline("p")
    p.producer(lambda: range(20), name="numbers")
    p.add(Tracked("tracked", strategy="spawn_thread"))
    p.consumer(out.add, name="sink")
    p.run()
    assert sorted(out.items) == list(range(1, 21))
    opens = [t for kind, t in events.items if kind == "open"]
    closes = [t for kind, t in events.items if kind == "close"]
    assert len(opens) == len(closes) == 20


class AsyncDoubler(mg.Stage):
    async def process(self, item):
        await asyncio.sleep(0)
        return item * 2


def test_custom_stage_with_async_process_runs_on_an_event_loop():
    out = Collector()
    p = mg.Pipeline("p")
    p.producer(lambda: range(50), name="numbers")
    p.add(AsyncDoubler("double"))
    p.consumer(out.add, name="sink")
    p.run()
    assert sorted(out.items) == [2 * i for i in range(50)]


@pytest.mark.parametrize(
    "strategy", ["threads", "spawn_thread", "fork_ipc", "spawn_fork", "inline"]
)
def test_custom_stage_with_async_process_and_a_sync_strategy_is_rejected(strategy):
    p = mg.Pipeline("p")
    p.producer(lambda: range(3), name="numbers")
    with pytest.raises(mg.DefinitionError, match=r"'double'.*async def process.*async"):
        p.add(AsyncDoubler("double", strategy=strategy))
        p.run()


class Late(mg.Task):
    def __init__(self, gate):
        self.gate = gate
        self.out = Collector()

    @mg.producer
    def first(self):
        self.gate.wait(5)
        self.trigger("late")
        yield 1

    @mg.producer(auto_start=False)
    def late(self):
        yield 2

    @mg.consumer
    def sink(self, x):
        self.out.add(x)


def test_trigger_from_a_stage_starts_the_producer_of_its_own_run():
    gate_a, gate_b = threading.Event(), threading.Event()
    task_a, task_b = Late(gate_a), Late(gate_b)
    run_a = task_a.start()
    run_b = task_b.start()  # the newest run: it used to receive run_a's trigger
    gate_a.set()
    result_a = run_a.wait(5)
    gate_b.set()
    result_b = run_b.wait(5)
    assert result_a.status == result_b.status == "ok"
    assert sorted(task_a.out.items) == sorted(task_b.out.items) == [1, 2]


def test_trigger_from_a_stage_of_the_same_task_instance_run_twice():
    gate = threading.Event()
    task = Late(gate)
    runs = [task.start(), task.start()]
    gate.set()
    assert [r.wait(5).status for r in runs] == ["ok", "ok"]
    assert sorted(task.out.items) == [1, 1, 2, 2]


def test_cancel_stops_an_accumulator_between_the_items_of_a_chunk():
    started = Collector()

    class Slow(mg.Task):
        @mg.producer
        def numbers(self):
            yield from range(400)

        # One batch per key, all flushed together at the end of the stream.
        @mg.accumulator(max_size=10_000, key=lambda x: x)
        def batch(self, items):
            started.add(items)
            time.sleep(0.05)
            return items

        @mg.consumer
        def sink(self, _):
            pass

    run = Slow().start()
    assert started.wait_for(1, 5)
    run.cancel()
    t = time.monotonic()
    assert run.wait(5).status == "cancelled"
    assert time.monotonic() - t < 1.0
    assert len(started) < 40  # not the rest of the chunk in hand


def test_runs_are_collectable_after_they_end():
    class Job(mg.Task):
        def __init__(self):
            self.payload = bytearray(1 << 20)

        @mg.producer
        def numbers(self):
            yield from range(10)

        @mg.processor(threads=2, retries=1)
        def double(self, x):
            return x * 2

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            pass

        @mg.consumer
        def sink(self, x):
            pass

    refs = []
    for _ in range(5):
        task = Job()
        task.run()
        refs.append(weakref.ref(task))
        del task
    gc.collect()
    assert [r() for r in refs] == [None] * 5


def test_failed_and_cancelled_runs_are_collectable_too():
    class Boom(mg.Task):
        @mg.producer
        def numbers(self):
            yield from range(10)

        @mg.processor
        def fail(self, x):
            raise ValueError(x)

    refs = []
    for _ in range(3):
        task = Boom()
        with pytest.raises(mg.PipelineError):
            task.run()
        refs.append(weakref.ref(task))
        del task
    gc.collect()
    assert [r() for r in refs] == [None] * 3


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("ending", ["cancel", "fail"])
def test_async_stage_closes_its_event_loop_on_every_path(ending):
    class Fetch(mg.Task):
        @mg.producer
        def numbers(self):
            yield from range(10_000)

        @mg.processor(concurrency=4)
        async def fetch(self, x):
            await asyncio.sleep(0.001)
            if ending == "fail" and x == 20:
                raise ValueError(x)
            return x

        @mg.consumer
        def sink(self, _):
            pass

    gc.collect()
    before = _open_fds()
    for _ in range(5):
        run = Fetch().start()
        if ending == "cancel":
            time.sleep(0.05)
            run.cancel()
            run.wait(5)
        else:
            with pytest.raises(mg.PipelineError):
                run.wait(5)
    # No collection here: the loops must be closed by the runtime, not by a finalizer.
    assert _open_fds() <= before


def test_two_nested_pipelines_with_their_own_producers_run_side_by_side():
    out1, out2 = Collector(), Collector()
    pipe1 = mg.Pipeline("pipe1")
    pipe1.producer(lambda: range(3), name="gen1")
    pipe1.consumer(out1.add, name="sink1")
    pipe2 = mg.Pipeline("pipe2")
    pipe2.producer(lambda: range(10, 13), name="gen2")
    pipe2.consumer(out2.add, name="sink2")
    root = mg.Pipeline("root")
    root.pipeline(pipe1, name="pipe1")
    root.pipeline(pipe2, name="pipe2")
    root.run()
    assert sorted(out1.items) == [0, 1, 2]
    assert sorted(out2.items) == [10, 11, 12]


_REFUSED_THREADS = r"""
import re, resource, threading
import minigun as mg

class Wide(mg.Task):
    max_threads = 200

    @mg.producer
    def numbers(self):
        yield from range(1000)

    @mg.processor(threads=200)
    def double(self, x):
        return x * 2

    @mg.consumer
    def sink(self, x):
        pass

task = Wide()
with open("/proc/self/status") as f:
    size = int(re.search(r"VmSize:\s+(\d+) kB", f.read()).group(1)) * 1024
# Room for one thread's stack (40 MiB: RUST_MIN_STACK, set by the test), not for 200.
resource.setrlimit(resource.RLIMIT_AS, (size + 64 * 2**20, resource.RLIM_INFINITY))
try:
    task.run()
except mg.PipelineError as error:
    print("failed:", error)
print("threads left:", threading.active_count())
"""


def test_a_thread_the_os_refuses_fails_the_run_cleanly():
    """The address-space limit must refuse a thread's stack, not a started thread's next
    allocation, which no runtime survives (about 1 run in 100 aborted in malloc with the
    default 2 MiB stacks under load): stacks of 40 MiB exhaust the 64 MiB of room at the
    second thread and leave the heap the rest."""
    env = {**os.environ, "RUST_MIN_STACK": str(40 * 2**20)}
    done = subprocess.run(
        [sys.executable, "-c", _REFUSED_THREADS],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "failed: stage 'double' failed" in done.stdout
    assert "refused to start a thread" in done.stdout
    assert "threads left: 1" in done.stdout


# -- a failed attempt delivers nothing, without retries= too (in-process workers, async) ----


async def async_emits_then_fails(x):
    mg.emit(("early", x))
    await asyncio.sleep(0)
    if x % 2:
        raise ValueError(x)
    return ("out", x)


async def async_yields_then_fails(x):
    yield ("early", x)
    await asyncio.sleep(0)
    if x % 2:
        raise ValueError(x)
    yield ("out", x)


def run_half_failing(work, **options):
    """Items 0..9 through ``work`` (odd items fail, no retries, a handler takes them):
    (what the sink received, the items on_error got, the stage's stats)."""
    out, failed = Collector(), Collector()
    p = mg.Pipeline("p")
    p.producer(lambda: range(10), name="numbers")
    p.processor(work, name="work", **options)
    p.consumer(out.add, name="sink")
    p.on_error(ValueError)(lambda error, item, stage: failed.add(item))
    result = p.run()
    assert result.status == "ok"
    return out.items, failed.items, result.stats["work"]


EVEN_ITEMS_ONLY = sorted(
    [("early", x) for x in range(0, 10, 2)] + [("out", x) for x in range(0, 10, 2)]
)


@pytest.mark.parametrize("work", [emits_then_fails, yields_then_fails], ids=["emit", "generator"])
@pytest.mark.parametrize(
    "options",
    [{"strategy": "inline"}, {"strategy": "threads", "threads": 2}, {"strategy": "spawn_thread"}],
    ids=lambda o: o["strategy"],
)
def test_a_failed_item_without_retries_delivers_nothing_from_runtime_workers(work, options):
    out, failed, stats = run_half_failing(work, **options)
    assert sorted(out) == EVEN_ITEMS_ONLY
    assert sorted(failed) == [1, 3, 5, 7, 9]
    assert stats.items_out == len(out)


@pytest.mark.parametrize(
    "work", [async_emits_then_fails, async_yields_then_fails], ids=["emit", "generator"]
)
def test_a_failed_item_without_retries_delivers_nothing_from_an_async_stage(work):
    out, failed, stats = run_half_failing(work, strategy="async", concurrency=3)
    assert sorted(out) == EVEN_ITEMS_ONLY
    assert sorted(failed) == [1, 3, 5, 7, 9]
    assert stats.items_out == len(out)


def test_a_failed_accumulator_body_delivers_nothing_of_its_batch():
    out, failed = Collector(), Collector()
    p = mg.Pipeline("p")
    p.producer(lambda: range(10), name="numbers")

    @p.accumulator(name="batch", max_size=2)
    def batch(items):
        mg.emit(("early", items[0]))
        if items[0] == 4:
            raise ValueError(items)
        mg.emit(("out", items[0]))

    p.consumer(out.add, name="sink")
    p.on_error(ValueError)(lambda error, item, stage: failed.add(item))
    assert p.run().status == "ok"
    assert sorted(out.items) == sorted(
        [(kind, x) for kind in ("early", "out") for x in (0, 2, 6, 8)]
    )
    assert failed.items == [[4, 5]]


def test_a_generator_stage_delivers_an_items_values_when_the_item_completes():
    """A generator's yields are one attempt's output: none leaves before the generator
    ends (it might still raise)."""
    out = Collector()
    arrived_mid_item = Collector()

    def work(x):
        yield (x, "a")
        # Without the hold, the flusher sends (x, "a") to the idle sink within ~1 ms.
        arrived_mid_item.add(out.wait_for(x * 2 + 1, timeout=0.2))
        yield (x, "b")

    p = mg.Pipeline("p")
    p.producer(lambda: range(2), name="numbers")
    p.processor(work, name="work", strategy="inline")
    p.consumer(out.add, name="sink")
    p.run()
    assert sorted(out.items) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert arrived_mid_item.items == [False, False]
