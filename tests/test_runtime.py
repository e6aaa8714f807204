"""Properties of the runtime itself: the free-threaded build, chunking, stats."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
import weakref

import pytest
from _mg_helpers import os_threads

import minigun as mg

free_threaded = pytest.mark.skipif(
    getattr(sys, "_is_gil_enabled", lambda: True)(), reason="needs a free-threaded CPython"
)
linux = pytest.mark.skipif(sys.platform != "linux", reason="a Linux interface")


@free_threaded
def test_importing_minigun_keeps_the_gil_off():
    import minigun._minigun  # noqa: F401

    assert sys._is_gil_enabled() is False


def _compute_for(seconds: float) -> None:
    """Run pure Python (no call that lets the GIL go) for ``seconds``."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


@free_threaded
def test_threaded_stage_runs_python_in_parallel_without_the_gil():
    """Two workers of one stage overlap in pure-Python code."""
    inside = 0
    peak = 0
    lock = threading.Lock()

    def busy(x):
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        _compute_for(0.05)
        with lock:
            inside -= 1

    p = mg.Pipeline("parallel")
    p.producer(lambda: range(8), name="gen")
    p.consumer(busy, threads=2)
    p.run()
    assert peak == 2


def test_cheap_items_travel_in_chunks():
    p = mg.Pipeline("chunks")
    p.producer(lambda: range(20_000), name="gen")
    p.consumer(lambda x: None, name="sink")
    stats = p.run().stats["sink"]
    assert stats.items_in == 20_000
    assert stats.chunks_in < 20_000 / 8, stats


def test_slow_items_spread_over_every_worker():
    seen = set()
    lock = threading.Lock()

    def slow(x):
        with lock:
            seen.add(threading.get_ident())
        time.sleep(0.01)

    p = mg.Pipeline("spread")
    p.producer(lambda: range(40), name="gen")
    p.consumer(slow, threads=4)
    p.run()
    assert len(seen) == 4


def test_an_item_after_an_idle_spell_does_not_wait_in_a_buffer_while_the_producer_blocks():
    """The run's flusher dozes once every buffer has been empty for a while (for up to a
    second); the first item after that leaves the producer's buffer as promptly. The burst
    first makes the consumer's chunks big, so a lone item waits in the buffer for the
    flusher: a lost wake-up would hold it about 0.8 s."""
    arrived = threading.Event()
    delays = []

    def gen():
        yield from range(1_000)
        for item in ("late", "later"):
            time.sleep(0.2)  # nothing buffered anywhere: the flusher dozes
            arrived.clear()
            yield item
            sent = time.monotonic()
            if not arrived.wait(5):
                raise AssertionError(f"{item!r} never left the producer's buffer")
            delays.append(time.monotonic() - sent)

    def sink(item):
        if isinstance(item, str):
            arrived.set()

    p = mg.Pipeline("idle")
    p.producer(gen)
    p.consumer(sink)
    p.run()
    assert len(delays) == 2 and max(delays) < 0.4, delays


def test_an_item_does_not_wait_in_a_buffer_while_the_producer_blocks():
    """The first item reaches the consumer while the producer is still blocked."""
    arrived = threading.Event()

    def gen():
        yield "first"
        if not arrived.wait(5):
            raise AssertionError("the first item never left the producer's buffer")
        yield "second"

    got = []

    def sink(x):
        got.append(x)
        arrived.set()

    p = mg.Pipeline("prompt")
    p.producer(gen)
    p.consumer(sink)
    p.run()
    assert got == ["first", "second"]


def _flusher_wakeups() -> int:
    """Voluntary context switches of the threads named as the run's flusher, so far."""
    total = 0
    for tid in os_threads():
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                if comm.read().strip() != "minigun-flusher":
                    continue
            with open(f"/proc/self/task/{tid}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            continue  # the thread ended meanwhile
    return total


@linux
def test_around_a_slow_stage_the_flusher_sleeps_between_items():
    """Each item of a producer that takes 30 ms per item waits in its buffer for the
    flusher, which then dozes until the next: a handful of wake-ups per item (the bell, a
    look or two until the item is 1 ms old, two empty looks), not a look every 0.5 ms all
    along (60 per item), nor twenty empty looks before each doze (about 25)."""
    counts = []

    def gen():
        for i in range(12):
            time.sleep(0.03)
            yield i

    def sink(i):
        if i in (1, 11):
            counts.append(_flusher_wakeups())

    p = mg.Pipeline("slow producer")
    p.producer(gen, name="gen")
    p.consumer(sink, name="sink")
    p.run()
    per_item = (counts[1] - counts[0]) / 10
    assert 0 < per_item < 12, per_item


def _sleeps(x: int) -> int:
    time.sleep(0.002)  # lets the GIL go inside user code, where the runtime cannot see
    return x


def _computes(x: int) -> int:
    _compute_for(0.002)  # keeps the GIL
    return x


@pytest.mark.parametrize("slow", [_sleeps, _computes])
def test_workers_waiting_for_slow_user_code_do_not_busy_wait(slow):
    """On a GIL build a worker that wants the GIL while another worker holds it waits
    awake for a moment, so it can take the GIL the instant it is free. That wait is
    bounded: around a stage whose items take long, the run costs about the CPU time its
    user code takes, not an extra core polling all along."""
    p = mg.Pipeline("slow")
    p.producer(lambda: range(150), name="gen")
    p.processor(slow, name="slow")
    p.consumer(lambda x: None, name="sink")
    cpu, wall = time.process_time(), time.perf_counter()
    p.run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    user_code = 0.0 if slow is _sleeps else 1.0  # cores the user code itself keeps busy
    assert cpu < (user_code + 0.4) * wall, (cpu, wall)


class Tally:
    """A stateful stage written as a callable object: doubles its items, counts its calls,
    and refuses 13."""

    def __init__(self) -> None:
        self.calls = 0
        # spawn_thread calls it from several threads at once, and on a free-threaded build
        # an unguarded `self.calls += 1` loses counts (a CI run counted 99 calls of 100).
        self._lock = threading.Lock()

    def __call__(self, x: int) -> int:
        with self._lock:
            self.calls += 1
        if x == 13:
            raise ValueError("unlucky")
        return 2 * x


class InheritedTally(Tally):
    """Its ``__call__`` comes from the base class."""


class GeneratingTally(Tally):
    """Its ``__call__`` is a generator: each item goes out twice."""

    def __call__(self, x: int):  # type: ignore[override]
        yield super().__call__(x)
        yield 2 * x


@pytest.mark.parametrize("strategy", ["inline", "threads", "spawn_thread"])
@pytest.mark.parametrize("kind", [Tally, InheritedTally, GeneratingTally])
def test_a_callable_object_stage_is_called_the_way_python_calls_it(strategy, kind):
    """The runtime calls a callable object through its class's ``__call__`` bound to it
    (cheaper than calling the object), which must mean what ``stage(x)`` means: the state
    lands on the object the user passed, an instance attribute named ``__call__`` is not
    what a call runs, and a failing item reaches on_error with the item."""
    stage = kind()
    stage.__call__ = lambda x: -1  # ignored by stage(x): Python looks __call__ up on the type
    out, failed = [], []
    p = mg.Pipeline("callable")
    p.producer(lambda: range(100))
    p.processor(stage, strategy=strategy, name="tally")
    p.consumer(out.append)
    p.on_error(ValueError)(lambda error, item, where: failed.append((item, where)))
    p.run()
    per_item = 2 if kind is GeneratingTally else 1
    assert sorted(out) == sorted([2 * x for x in range(100) if x != 13] * per_item)
    assert failed == [(13, "tally")]
    assert stage.calls == 100


# -- timer slack (Linux) -------------------------------------------------------------------

PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30


def _timer_slack_ns() -> int:
    return int(ctypes.CDLL(None).prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0))


def _slack_of_this_worker(_item: int) -> int:
    return _timer_slack_ns()


async def _slack_of_this_event_loop(_item: int) -> int:
    return _timer_slack_ns()


@linux
@pytest.mark.parametrize(
    "strategy", ["inline", "threads", "spawn_thread", "async", "fork_ipc", "spawn_fork"]
)
def test_stage_code_sleeps_with_a_1_microsecond_timer_slack_and_the_caller_keeps_its_own(
    strategy,
):
    """A stage's `time.sleep(0.002)` wakes within a microsecond of its time, not Linux's
    default 50: the runtime's threads, and the children they fork, ask for 1 µs. The
    thread that calls `run()` is the user's and keeps what it had."""
    fn = _slack_of_this_event_loop if strategy == "async" else _slack_of_this_worker
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(70_000), 0, 0, 0)
    try:
        seen: list[int] = []
        p = mg.Pipeline("slack")
        p.producer(lambda: range(4), name="source")
        p.processor(fn, name="look", strategy=strategy)
        p.consumer(seen.append, name="sink")
        p.run()
        assert seen == [1_000] * 4
        assert _timer_slack_ns() == 70_000
    finally:
        libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(0), 0, 0, 0)  # 0: the default again


_kept_by_the_worker = threading.local()


def _run_recording_threads(seen: list[tuple[int, bool, float]]) -> None:
    """One item through a producer and a consumer; each stage records its OS thread,
    whether that thread's ``threading.local`` still held what an earlier worker kept, and
    when (``time.monotonic()``)."""

    def record() -> None:
        kept = hasattr(_kept_by_the_worker, "mark")
        seen.append((threading.get_native_id(), kept, time.monotonic()))
        _kept_by_the_worker.mark = True

    def produce() -> list[int]:
        record()
        return [1]

    p = mg.Pipeline("back to back")
    p.producer(produce, name="source")
    p.consumer(lambda _item: record(), name="sink")
    p.run()


@linux
def test_a_run_right_after_another_takes_its_threads_with_nothing_kept_from_it():
    """A runtime thread whose work is done parks for 5 ms, and the next run's workers
    take the parked threads instead of starting new ones; what the earlier workers kept
    in a ``threading.local`` was released with their work.

    Which parked thread a worker takes is the pool's choice: the first run's flusher
    thread (a run gets one once it lasts 2 ms) may serve the second run's consumer, and
    without a GIL the second run's producer can finish and park again before its
    consumer takes a thread. So the second run's threads are compared with every thread
    the process had once the first run returned. It can count on them only when all four
    workers recorded within 4 ms: each of the first run's threads parked before the run
    returned, and each of the second run's workers was handed its thread before it
    recorded, so no thread had been parked for 4 ms when it was taken. A loaded machine
    may hold a worker up for longer, and then the pair is tried again."""
    for _ in range(20):
        first: list[tuple[int, bool, float]] = []
        second: list[tuple[int, bool, float]] = []
        _run_recording_threads(first)
        parked = {int(tid) for tid in os_threads()}
        _run_recording_threads(second)
        times = [when for _, _, when in first + second]
        if max(times) - min(times) < 0.004:
            break
    else:
        pytest.fail("held up past the threads' 5 ms twenty times in a row")
    assert {tid for tid, _, _ in second} <= parked, "a new thread started"
    assert [kept for _, kept, _ in first + second] == [False] * 4


@linux
def test_the_threads_of_the_last_run_end_soon_after_it():
    seen: list[int] = []
    p = mg.Pipeline("last")
    p.producer(lambda: range(40), name="source")
    p.consumer(lambda _item: seen.append(threading.get_native_id()), threads=4, name="sink")
    p.run()
    workers = {str(tid) for tid in seen}
    assert workers, "no item reached the sink"
    deadline = time.monotonic() + 2
    while workers & os_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not workers & os_threads(), "a runtime thread outlived its run by 2 s"


class _HookedJob(mg.Task):
    @mg.producer
    def source(self):
        yield from range(5)

    @mg.processor
    def double(self, x):
        if x == 3:
            raise ValueError(x)
        return x * 2

    @mg.consumer
    def sink(self, x):
        pass

    @mg.on_error(ValueError)
    def handled(self, error, item, stage):
        pass

    @mg.before_run
    def starting(self):
        pass

    @mg.after("double")
    def doubled(self):
        pass


def _builder_run(strategy: str) -> weakref.ref[object]:
    """Run a builder pipeline; a weak reference to one of its stage functions."""

    def double(x: int) -> int:
        return x * 2

    p = mg.Pipeline("per call")
    p.producer(lambda: range(5), name="source")
    p.processor(double, strategy=strategy)
    p.consumer(lambda _x: None, name="sink")
    p.before_worker(lambda: None, stage="sink")
    p.after("sink")(lambda: None)
    p.run()
    return weakref.ref(double)


def _task_run() -> weakref.ref[object]:
    """Run a Task with hooks and a handled failure; a weak reference to the Task."""
    job = _HookedJob()
    job.run()
    return weakref.ref(job)


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(lambda: _builder_run("threads"), id="builder-threads"),
        pytest.param(lambda: _builder_run("inline"), id="builder-inline"),
        pytest.param(lambda: _builder_run("spawn_thread"), id="builder-spawn_thread"),
        pytest.param(_task_run, id="task-with-hooks-and-on_error"),
    ],
)
def test_a_run_leaves_no_reference_cycle_for_the_garbage_collector(run):
    """What a run made is freed as soon as nothing refers to it, the stages it ran with
    it: a service that builds and runs a pipeline per call never makes the cyclic
    collector run on its account (it ran every seventh call, a tenth of the call's time).
    With the collector off, only reference counting can free the stage."""
    run()  # anything made once per process (imports, caches) is made now
    gc.collect()
    gc.disable()
    try:
        stage = run()
        assert stage() is None, "the run's objects outlived it, in a reference cycle"
    finally:
        gc.enable()
