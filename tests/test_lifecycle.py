"""Run lifecycle (API.md sections 3-6): hooks, on_error, failures, retries, limits and their
warnings, queue_size, RunResult and stats, start()/wait()/cancel()/trigger(), and
Ctrl-C / SIGTERM."""

import collections
import itertools
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from _mg_helpers import (
    PYTHON,
    Collector,
    Concurrency,
    Counts,
    minigun_warnings,
    subprocess_env,
    wait_until,
)

import minigun as mg

# ---------------------------------------------------------------------------
# before_run / after_run / before(stage) / after(stage)
# ---------------------------------------------------------------------------


def test_before_and_after_run_wrap_the_whole_run():
    events = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            events.add("gen")
            yield from range(3)

        @mg.consumer(threads=2)
        def sink(self, x):
            events.add(("item", x))

        @mg.before_run
        def setup(self):
            events.add("before_run")

        @mg.after_run
        def teardown(self):
            events.add("after_run")

    assert Job().run().status == "ok"
    ev = events.items
    assert ev[0] == "before_run"
    assert ev[-1] == "after_run"
    assert ev.count("before_run") == 1 and ev.count("after_run") == 1
    assert collections.Counter(e for e in ev if isinstance(e, tuple)) == collections.Counter(
        ("item", x) for x in range(3)
    )


def test_before_and_after_stage_hooks_run_once_around_the_stage():
    events = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(12)

        @mg.processor(threads=3)
        def work(self, x):
            events.add(("work", x))
            return x

        @mg.consumer
        def sink(self, x):
            pass

        @mg.before("work")
        def before_work(self):
            events.add("before:work")

        @mg.after("work")
        def after_work(self):
            events.add("after:work")

        @mg.after("sink")
        def after_sink(self):
            events.add("after:sink")

    Job().run()
    ev = events.items
    assert ev.count("before:work") == 1
    assert ev.count("after:work") == 1
    assert ev.count("after:sink") == 1
    work_positions = [i for i, e in enumerate(ev) if isinstance(e, tuple)]
    assert len(work_positions) == 12
    assert ev.index("before:work") < min(work_positions)
    assert ev.index("after:work") > max(work_positions)


def test_hooks_run_in_definition_order_base_first_and_prepend_goes_first():
    events = Collector()

    class Base(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer
        def sink(self, x):
            events.add("item")

        @mg.before_run
        def b1(self):
            events.add("b1")

        @mg.before_run
        def b2(self):
            events.add("b2")

        @mg.after_run
        def a1(self):
            events.add("a1")

    class Sub(Base):
        @mg.before_run
        def s1(self):
            events.add("s1")

        @mg.before_run(prepend=True)
        def s0(self):
            events.add("s0")

        @mg.after_run
        def a2(self):
            events.add("a2")

    Sub().run()
    assert events.items == ["s0", "b1", "b2", "s1", "item", "a1", "a2"]

    events2 = events.items
    Base().run()
    assert events.items[len(events2) :] == ["b1", "b2", "item", "a1"]


def test_stage_hooks_see_the_task_instance():
    seen = Collector()

    class Job(mg.Task):
        def __init__(self):
            self.marker = "mine"

        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer
        def sink(self, x):
            pass

        @mg.before("sink")
        def hook(self):
            seen.add(self.marker)

    Job().run()
    assert seen.items == ["mine"]


# ---------------------------------------------------------------------------
# on_error and failures
# ---------------------------------------------------------------------------


def test_on_error_handler_receives_error_item_and_stage_name_and_run_goes_on():
    handled = Collector()
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(10)

        @mg.processor
        def picky(self, x):
            if x in (3, 7):
                raise ValueError(f"bad {x}")
            return x

        @mg.consumer
        def sink(self, x):
            out.add(x)

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            handled.add((type(error), str(error), item, stage))

    result = Job().run()
    assert sorted(handled.items) == [
        (ValueError, "bad 3", 3, "picky"),
        (ValueError, "bad 7", 7, "picky"),
    ]
    assert out.counter() == collections.Counter(x for x in range(10) if x not in (3, 7))
    assert result.stats["picky"].errors == 2


def test_on_error_handler_sees_self():
    seen = Collector()

    class Job(mg.Task):
        def __init__(self):
            self.tag = "task-self"

        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer
        def boom(self, x):
            raise KeyError(x)

        @mg.on_error(KeyError)
        def handle(self, error, item, stage):
            seen.add(self.tag)

    Job().run()
    assert seen.items == ["task-self"]


def test_on_error_with_several_types_matches_subclasses():
    handled = Collector()

    class MyError(LookupError):
        pass

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.consumer
        def boom(self, x):
            raise [KeyError, MyError, ZeroDivisionError][x]("x")

        @mg.on_error(LookupError, ArithmeticError)
        def handle(self, error, item, stage):
            handled.add(type(error).__name__)

    Job().run()
    assert handled.counter() == collections.Counter(["KeyError", "MyError", "ZeroDivisionError"])


def test_on_error_stage_filter():
    handled = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        @mg.processor
        def first(self, x):
            if x == 1:
                raise ValueError("first")
            return x

        @mg.consumer
        def second(self, x):
            if x == 2:
                raise ValueError("second")

        @mg.on_error(ValueError, stage="first")
        def only_first(self, error, item, stage):
            handled.add(("first-handler", item, stage))

        @mg.on_error(ValueError, stage="second")
        def only_second(self, error, item, stage):
            handled.add(("second-handler", item, stage))

    Job().run()
    assert handled.counter() == collections.Counter(
        [("first-handler", 1, "first"), ("second-handler", 2, "second")]
    )


def test_on_error_for_another_stage_does_not_handle():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.consumer
        def explode(self, x):
            raise ValueError("boom")

        @mg.consumer(from_="gen")
        def quiet(self, x):
            pass

        @mg.on_error(ValueError, stage="quiet")
        def handle(self, error, item, stage):
            pass

    with pytest.raises(mg.PipelineError) as info:
        Job().run()
    assert isinstance(info.value.__cause__, ValueError)


def test_on_error_for_another_type_does_not_handle():
    handled = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer
        def explode(self, x):
            raise KeyError("nope")

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            handled.add(error)

    with pytest.raises(mg.PipelineError) as info:
        Job().run()
    assert isinstance(info.value.__cause__, KeyError)
    assert handled.items == []


def test_unhandled_error_raises_pipeline_error_with_cause_stage_and_result():
    raised = Collector()
    after = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(5)

        @mg.processor
        def explode(self, x):
            if x == 2:
                exc = RuntimeError("kaboom")
                raised.add(exc)
                raise exc
            return x

        @mg.consumer
        def sink(self, x):
            pass

        @mg.after_run
        def done(self):
            after.add("after_run")

    with pytest.raises(mg.PipelineError) as info:
        Job().run()
    err = info.value
    assert isinstance(err, mg.MinigunError)
    assert err.__cause__ is raised.items[0]
    assert "explode" in str(err)
    assert isinstance(err.result, mg.RunResult)
    assert err.result.status == "failed"
    assert after.items == ["after_run"], "after_run also runs when the run fails"


@pytest.mark.timeout(30)
def test_unhandled_error_stops_an_endless_run():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in itertools.count():
                yield i
                time.sleep(0.001)

        @mg.consumer(threads=2)
        def explode(self, x):
            if x == 20:
                raise ValueError("stop here")

    t0 = time.monotonic()
    with pytest.raises(mg.PipelineError) as info:
        Job().run()
    assert isinstance(info.value.__cause__, ValueError)
    assert time.monotonic() - t0 < 20


def test_handler_that_raises_fails_the_run_with_that_exception():
    class HandlerFailed(Exception):
        pass

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer
        def explode(self, x):
            raise ValueError("original")

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            raise HandlerFailed("from handler")

    with pytest.raises(Exception) as info:
        Job().run()
    err = info.value
    assert isinstance(err, HandlerFailed) or (
        isinstance(err, mg.PipelineError) and isinstance(err.__cause__, HandlerFailed)
    ), repr(err)


def test_producer_error_goes_to_on_error_with_item_none():
    handled = Collector()
    calls = Counts()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            calls.incr("gen")
            yield 1
            raise ValueError("producer broke")

        @mg.consumer
        def sink(self, x):
            pass

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            handled.add((str(error), item, stage))

    Job().run()
    assert handled.items == [("producer broke", None, "gen")]
    assert calls["gen"] == 1


def test_unhandled_producer_error_fails_the_run():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1
            raise OSError("disk gone")

        @mg.consumer
        def sink(self, x):
            pass

    with pytest.raises(mg.PipelineError) as info:
        Job().run()
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.result.status == "failed"


# ---------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------


def test_retries_rerun_the_item_and_count_in_stats():
    attempts = Counts()
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(5)

        @mg.processor(retries=2)
        def flaky(self, x):
            n = attempts.incr(x)
            if x == 3 and n <= 2:
                raise ValueError("transient")
            return x

        @mg.consumer
        def sink(self, x):
            out.add(x)

    result = Job().run()
    assert result.status == "ok"
    assert attempts[3] == 3
    assert all(attempts[x] == 1 for x in (0, 1, 2, 4))
    assert out.counter() == collections.Counter(range(5))
    assert result.stats["flaky"].retries == 2


def test_values_emitted_by_a_failed_attempt_are_discarded():
    attempts = Counts()
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        @mg.processor(retries=3)
        def flaky(self, x):
            n = attempts.incr(x)
            self.emit(("emitted", x))
            if x % 2 == 0 and n == 1:
                raise ValueError("first attempt fails")
            return ("returned", x)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    expected = [("emitted", x) for x in range(4)] + [("returned", x) for x in range(4)]
    assert out.counter() == collections.Counter(expected)


def test_values_yielded_by_a_failed_generator_attempt_are_discarded():
    attempts = Counts()
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor(retries=1)
        def flaky(self, x):
            n = attempts.incr(x)
            yield (x, "a")
            if n == 1:
                raise ValueError("fail after one yield")
            yield (x, "b")

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    expected = [(x, s) for x in range(3) for s in "ab"]
    assert out.counter() == collections.Counter(expected)


def test_exhausted_retries_go_to_on_error_once():
    attempts = Counts()
    handled = Collector()
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        @mg.processor(retries=2)
        def flaky(self, x):
            attempts.incr(x)
            if x == 0:
                raise ValueError("always")
            return x

        @mg.consumer
        def sink(self, x):
            out.add(x)

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            handled.add((item, stage))

    result = Job().run()
    assert attempts[0] == 3
    assert handled.items == [(0, "flaky")]
    assert out.counter() == collections.Counter([1, 2, 3])
    assert result.stats["flaky"].errors == 1


def test_retry_on_limits_which_exceptions_are_retried():
    attempts = Counts()
    handled = Collector()
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor(retries=2, retry_on=(KeyError,))
        def flaky(self, x):
            n = attempts.incr(x)
            if x == 1:
                raise ValueError("not retried")
            if x == 2 and n == 1:
                raise KeyError("retried")
            return x

        @mg.consumer
        def sink(self, x):
            out.add(x)

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            handled.add(item)

    Job().run()
    assert attempts[1] == 1
    assert attempts[2] == 2
    assert handled.items == [1]
    assert out.counter() == collections.Counter([0, 2])


def test_no_retries_by_default():
    attempts = Counts()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer
        def sink(self, x):
            attempts.incr(x)
            raise ValueError("once")

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            pass

    Job().run()
    assert attempts[1] == 1


def test_retries_above_max_retries_are_capped():
    attempts = Counts()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer(retries=9)
        def stubborn(self, x):
            attempts.incr(x)
            raise ValueError("always")

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            pass

    Job().run()
    assert attempts[1] == 4  # 1 attempt + max_retries (3)


def test_capped_retries_log_one_warning_naming_the_stage(mg_caplog):
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.consumer(retries=9)
        def hopeful(self, x):
            pass

    assert Job().run().status == "ok"
    assert len(minigun_warnings(mg_caplog.records, "hopeful")) == 1


def test_class_max_retries_caps_retries():
    attempts = Counts()

    class Job(mg.Task):
        max_retries = 1

        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer(retries=5)
        def stubborn(self, x):
            attempts.incr(x)
            raise ValueError("always")

        @mg.on_error(ValueError)
        def handle(self, error, item, stage):
            pass

    Job().run()
    assert attempts[1] == 2


# ---------------------------------------------------------------------------
# Limits (section 5)
# ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_threads_above_max_threads_are_capped_with_one_warning(mg_caplog):
    conc = Concurrency()

    class Job(mg.Task):
        max_threads = 3

        @mg.producer
        def gen(self):
            yield from range(40)

        @mg.consumer(threads=20)
        def greedy(self, x):
            with conc:
                time.sleep(0.01)

    assert Job().run().status == "ok"
    assert conc.peak <= 3
    warnings = minigun_warnings(mg_caplog.records, "greedy")
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_cap_warning_is_logged_once_per_run(mg_caplog):
    class Job(mg.Task):
        max_threads = 2

        @mg.producer
        def gen(self):
            yield from range(5)

        @mg.consumer(threads=4)
        def greedy(self, x):
            pass

    Job().run()
    assert len(minigun_warnings(mg_caplog.records, "greedy")) == 1
    mg_caplog.clear()
    Job().run()
    assert len(minigun_warnings(mg_caplog.records, "greedy")) == 1


def test_no_cap_warning_within_limits(mg_caplog):
    class Job(mg.Task):
        max_threads = 4

        @mg.producer
        def gen(self):
            yield from range(5)

        @mg.consumer(threads=4, retries=3)
        def modest(self, x):
            pass

    Job().run()
    assert minigun_warnings(mg_caplog.records, "modest") == []


def test_run_option_overrides_class_limit(mg_caplog):
    class Job(mg.Task):
        max_threads = 2

        @mg.producer
        def gen(self):
            yield from range(5)

        @mg.consumer(threads=6)
        def greedy(self, x):
            pass

    Job().run(max_threads=8)
    assert minigun_warnings(mg_caplog.records, "greedy") == []
    Job().run()
    assert len(minigun_warnings(mg_caplog.records, "greedy")) == 1


def test_subclass_inherits_limits(mg_caplog):
    class Base(mg.Task):
        max_threads = 2

        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.consumer
        def sink(self, x):
            pass

    class Sub(Base):
        @mg.consumer(threads=5)
        def sink(self, x):
            pass

    Sub().run()
    assert len(minigun_warnings(mg_caplog.records, "sink")) == 1


@pytest.mark.timeout(30)
def test_threads_option_gives_that_many_concurrent_workers():
    barrier = threading.Barrier(3, timeout=5)

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in range(6):
                yield i
                time.sleep(0.05)

        @mg.consumer(threads=3)
        def work(self, x):
            if x < 3:
                barrier.wait()  # BrokenBarrierError unless 3 workers run at once

    assert Job().run().status == "ok"


@pytest.mark.timeout(30)
def test_min_threads_raises_the_default_worker_count():
    barrier = threading.Barrier(3, timeout=5)
    conc = Concurrency()

    class Job(mg.Task):
        min_threads = 3

        @mg.producer
        def gen(self):
            for i in range(6):
                yield i
                time.sleep(0.05)

        @mg.consumer
        def work(self, x):
            with conc:
                if x < 3:
                    barrier.wait()

    assert Job().run().status == "ok"
    assert conc.peak == 3


# ---------------------------------------------------------------------------
# queue_size
# ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_queue_size_bounds_how_far_a_producer_runs_ahead():
    produced = Counts()
    release = threading.Event()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in range(60):
                produced.incr()
                yield i

        @mg.consumer(queue_size=3)
        def slow(self, x):
            release.wait(10)

    run = Job().start()
    try:
        wait_until(lambda: produced[None] > 0)
        time.sleep(0.5)  # let the producer run ahead as far as it can
        ahead = produced[None]
    finally:
        release.set()
    result = run.wait(timeout=20)
    assert result.status == "ok"
    # queue (3) + the item being processed + one waiting to be sent, with a little slack
    assert ahead <= 3 + 5, ahead
    assert result.stats["slow"].items_in == 60


@pytest.mark.timeout(30)
def test_queue_size_none_is_unbounded():
    produced = Counts()
    release = threading.Event()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in range(3000):
                produced.incr()
                yield i

        @mg.consumer(queue_size=None)
        def slow(self, x):
            release.wait(10)

    run = Job().start()
    try:
        ran_ahead = wait_until(lambda: produced[None] == 3000, timeout=10)
    finally:
        release.set()
    run.wait(timeout=20)
    assert ran_ahead, "an unbounded queue lets the producer finish while the consumer blocks"


# ---------------------------------------------------------------------------
# RunResult and stats
# ---------------------------------------------------------------------------


def test_run_result_stats_count_items_in_and_out():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(10)

        @mg.processor(threads=2)
        def double(self, x):
            return x * 2

        @mg.processor
        def evens_only(self, x):
            return x if x % 4 == 0 else None

        @mg.processor
        def fan(self, x):
            yield x
            yield x

        @mg.consumer
        def sink(self, x):
            pass

    result = Job().run()
    assert result.status == "ok"
    s = result.stats
    assert s["gen"].items_out == 10
    assert (s["double"].items_in, s["double"].items_out) == (10, 10)
    assert (s["evens_only"].items_in, s["evens_only"].items_out) == (10, 5)
    assert (s["fan"].items_in, s["fan"].items_out) == (5, 10)
    assert s["sink"].items_in == 10
    for name in ("gen", "double", "evens_only", "fan", "sink"):
        assert s[name].errors == 0
        assert s[name].retries == 0


def test_run_result_duration_latency_and_throughput():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(10)

        @mg.consumer
        def slow(self, x):
            time.sleep(0.02)

    t0 = time.monotonic()
    result = Job().run()
    wall = time.monotonic() - t0
    assert isinstance(result.duration, float)
    assert 0.19 <= result.duration <= wall + 0.05
    st = result.stats["slow"]
    assert 0.015 <= st.latency_p50 <= 2.0
    assert st.latency_p50 <= st.latency_p99 <= 5.0
    assert 0 < st.throughput <= 1000


def test_summary_is_a_text_table_naming_every_stage():
    class Job(mg.Task):
        @mg.producer
        def numbers(self):
            yield from range(3)

        @mg.processor
        def squared(self, x):
            return x * x

        @mg.consumer
        def printer_stage(self, x):
            pass

    summary = Job().run().summary()
    assert isinstance(summary, str)
    for name in ("numbers", "squared", "printer_stage"):
        assert name in summary
    lines = [line for line in summary.splitlines() if line.strip()]
    assert len(lines) >= 4  # a header and one row per stage


# ---------------------------------------------------------------------------
# start() / Run
# ---------------------------------------------------------------------------


def test_start_returns_a_run_whose_wait_returns_the_result():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(5)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    run = Job().start()
    assert isinstance(run, mg.Run)
    result = run.wait(timeout=10)
    assert isinstance(result, mg.RunResult)
    assert result.status == "ok"
    assert run.running is False
    assert out.counter() == collections.Counter(range(5))


@pytest.mark.timeout(30)
def test_wait_with_timeout_raises_timeout_error_while_running():
    gate = threading.Event()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1
            gate.wait(10)
            yield 2

        @mg.consumer
        def sink(self, x):
            pass

    run = Job().start()
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            run.wait(timeout=0.2)
        assert time.monotonic() - t0 < 5
        assert run.running is True
    finally:
        gate.set()
    assert run.wait(timeout=10).status == "ok"
    assert run.running is False


@pytest.mark.timeout(30)
def test_run_stats_is_a_live_snapshot():
    gate = threading.Event()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)
            gate.wait(10)
            yield 3

        @mg.consumer
        def sink(self, x):
            pass

    def sink_items_in():
        try:
            return run.stats["sink"].items_in
        except KeyError:  # not started yet
            return -1

    run = Job().start()
    try:
        assert wait_until(lambda: sink_items_in() == 3, timeout=5)
    finally:
        gate.set()
    assert run.wait(timeout=10).stats["sink"].items_in == 4


@pytest.mark.timeout(30)
def test_cancel_stops_an_endless_run_with_status_cancelled():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in itertools.count():
                yield i
                time.sleep(0.005)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    run = Job().start()
    assert out.wait_for(1, timeout=10)
    assert run.running is True
    run.cancel()
    result = run.wait(timeout=10)
    assert result.status == "cancelled"
    assert run.running is False
    n = len(out)
    time.sleep(0.1)
    assert len(out) == n, "nothing runs after the run was cancelled"


@pytest.mark.timeout(30)
def test_wait_raises_pipeline_error_of_a_failed_background_run():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer
        def explode(self, x):
            raise ValueError("bg")

    run = Job().start()
    with pytest.raises(mg.PipelineError) as info:
        run.wait(timeout=10)
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.result.status == "failed"


# ---------------------------------------------------------------------------
# auto_start=False and trigger()
# ---------------------------------------------------------------------------


def _late_job(out):
    class Job(mg.Task):
        @mg.producer
        def early(self):
            yield from range(3)

        @mg.producer(auto_start=False)
        def late(self):
            yield from range(100, 103)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    return Job


@pytest.mark.timeout(30)
def test_untriggered_producer_keeps_the_run_open_until_triggered():
    out = Collector()
    run = _late_job(out)().start()
    try:
        assert out.wait_for(3, timeout=5)
        with pytest.raises(TimeoutError):
            run.wait(timeout=0.3)
        assert sorted(out.items) == [0, 1, 2]
        run.trigger("late")
        result = run.wait(timeout=10)
    finally:
        if run.running:
            run.cancel()
    assert result.status == "ok"
    assert out.counter() == collections.Counter([0, 1, 2, 100, 101, 102])


@pytest.mark.timeout(30)
def test_trigger_rejects_unknown_names_non_producers_and_started_producers():
    out = Collector()
    run = _late_job(out)().start()
    try:
        assert out.wait_for(3, timeout=5)  # "early" has certainly started
        with pytest.raises(mg.RoutingError):
            run.trigger("no_such_stage")
        with pytest.raises(mg.RoutingError):
            run.trigger("sink")
        with pytest.raises(mg.RoutingError):
            run.trigger("early")  # auto-started already
        run.trigger("late")
        with pytest.raises(mg.RoutingError):
            run.trigger("late")  # already started
        result = run.wait(timeout=10)
    finally:
        if run.running:
            run.cancel()
    assert result.status == "ok"
    assert out.counter() == collections.Counter([0, 1, 2, 100, 101, 102])


@pytest.mark.timeout(30)
def test_cancel_a_run_waiting_for_an_untriggered_producer():
    out = Collector()
    run = _late_job(out)().start()
    assert out.wait_for(3, timeout=5)
    run.cancel()
    assert run.wait(timeout=10).status == "cancelled"


def test_self_trigger_from_a_stage():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def early(self):
            yield "go"

        @mg.producer(auto_start=False)
        def late(self):
            yield from range(3)

        @mg.consumer
        def sink(self, x):
            out.add(x)
            if x == "go":
                self.trigger("late")

    assert Job().run().status == "ok"
    assert out.counter() == collections.Counter(["go", 0, 1, 2])


def test_run_without_any_auto_start_producer_or_before_run_is_a_definition_error():
    class Job(mg.Task):
        @mg.producer(auto_start=False)
        def late(self):
            yield 1

        @mg.consumer
        def sink(self, x):
            pass

    with pytest.raises(mg.DefinitionError):
        Job().run()


def test_before_run_hook_may_trigger_a_manual_producer():
    out = Collector()

    class Job(mg.Task):
        @mg.producer(auto_start=False)
        def late(self):
            yield from range(4)

        @mg.consumer
        def sink(self, x):
            out.add(x)

        @mg.before_run
        def kick(self):
            self.trigger("late")

    assert Job().run().status == "ok"
    assert out.counter() == collections.Counter(range(4))


@pytest.mark.timeout(30)
def test_start_and_trigger_a_pipeline_with_only_manual_producers():
    out = Collector()

    class Job(mg.Task):
        @mg.producer(auto_start=False)
        def late(self):
            yield from range(4)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    run = Job().start()
    try:
        run.trigger("late")
        result = run.wait(timeout=10)
    finally:
        if run.running:
            run.cancel()
    assert result.status == "ok"
    assert out.counter() == collections.Counter(range(4))


# ---------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ---------------------------------------------------------------------------

_FOREVER_SCRIPT = textwrap.dedent(
    """
    import itertools, time
    import minigun as mg

    class Forever(mg.Task):
        @mg.producer
        def gen(self):
            for i in itertools.count():
                yield i
                time.sleep(0.02)

        @mg.consumer
        def sink(self, x):
            if x == 0:
                print("STARTED", flush=True)

        @mg.after_run
        def done(self):
            print("AFTER_RUN", flush=True)

    Forever().run()
    print("RUN_RETURNED", flush=True)
    """
)


def _start_forever(tmp_path):
    script = tmp_path / "forever_job.py"
    script.write_text(_FOREVER_SCRIPT)
    proc = subprocess.Popen(
        [PYTHON, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(tmp_path),
        cwd=str(tmp_path),
    )
    lines = []
    started = threading.Event()

    def read_stdout():
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "STARTED":
                started.set()

    err_chunks = []

    def read_stderr():
        err_chunks.append(proc.stderr.read())

    readers = [
        threading.Thread(target=read_stdout, daemon=True),
        threading.Thread(target=read_stderr, daemon=True),
    ]
    for t in readers:
        t.start()
    if not started.wait(30):
        proc.kill()
        proc.wait()
        for t in readers:
            t.join(5)
        pytest.fail(f"the pipeline never started: {''.join(err_chunks)}")
    return proc, lines, err_chunks, readers


def _finish(proc, readers, timeout=5):
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the run did not stop within {timeout} s of the signal")
    elapsed = time.monotonic() - t0
    for t in readers:
        t.join(5)
    return elapsed


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.timeout(60)
def test_ctrl_c_stops_the_run_and_raises_keyboard_interrupt(tmp_path):
    proc, lines, err_chunks, readers = _start_forever(tmp_path)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _finish(proc, readers)
    stderr = "".join(err_chunks)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in stderr, stderr
    assert "AFTER_RUN" in lines
    assert "RUN_RETURNED" not in lines


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.timeout(60)
def test_sigterm_stops_the_run_and_exits_143(tmp_path):
    proc, lines, err_chunks, readers = _start_forever(tmp_path)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _finish(proc, readers)
    stderr = "".join(err_chunks)
    assert proc.returncode == 143, (proc.returncode, stderr)
    assert "AFTER_RUN" in lines
    assert "RUN_RETURNED" not in lines


def _doubled_by_builder():
    p = mg.Pipeline("doubled")
    p.producer(lambda: range(3), name="source")
    p.processor(lambda x: x * 2, name="double")
    out = []
    p.consumer(out.append, name="sink")
    p.run()
    return sorted(out)


class _Doubled(mg.Task):
    @mg.producer
    def source(self):
        yield from range(3)

    @mg.processor
    def double(self, x):
        return x * 2

    @mg.consumer
    def sink(self, x):
        self.out.append(x)


def _doubled_by_task():
    task = _Doubled()
    task.out = []
    task.run()
    return sorted(task.out)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("run", [_doubled_by_builder, _doubled_by_task], ids=["builder", "task"])
def test_a_run_gives_back_the_sigterm_handler_it_found(run):
    """run() handles SIGTERM only while it waits: the process's own handler, a function
    or SIG_IGN, is the handler again once it returns."""

    def mine(signum, frame):
        raise AssertionError("not called")

    before = signal.getsignal(signal.SIGTERM)
    try:
        for handler in (mine, signal.SIG_IGN):
            signal.signal(signal.SIGTERM, handler)
            assert run() == [0, 2, 4]
            assert signal.getsignal(signal.SIGTERM) == handler
    finally:
        signal.signal(signal.SIGTERM, before)


_STUCK_SCRIPT = textwrap.dedent(
    """
    import time
    import minigun as mg

    class Stuck(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(10)

        @mg.consumer
        def slow(self, x):
            print("STARTED", flush=True)
            time.sleep(30)          # a long item: the first Ctrl-C waits for it

    Stuck().run()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.timeout(60)
def test_a_second_ctrl_c_abandons_the_clean_up_at_once(tmp_path):
    script = tmp_path / "stuck_job.py"
    script.write_text(_STUCK_SCRIPT)
    proc = subprocess.Popen(
        [PYTHON, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(tmp_path),
    )
    assert proc.stdout.readline().strip() == "STARTED"
    proc.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)  # still waiting for the item in hand
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=5)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in stderr
    assert "interrupted again" in stderr


_LEFT_RUNNING_SCRIPT = textwrap.dedent(
    """
    import itertools, time
    import minigun as mg

    class Forever(mg.Task):
        @mg.producer
        def gen(self):
            for i in itertools.count():
                yield i
                time.sleep(0.001)

        @mg.consumer
        def sink(self, x):
            pass

    Forever().start()
    time.sleep(0.2)
    print("EXITING", flush=True)
    """
)


@pytest.mark.timeout(60)
def test_interpreter_exit_stops_a_background_run_cleanly(tmp_path):
    script = tmp_path / "left_running.py"
    script.write_text(_LEFT_RUNNING_SCRIPT)
    done = subprocess.run(
        [PYTHON, str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        env=subprocess_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "EXITING" in done.stdout
