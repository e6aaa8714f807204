"""The async strategy (API.md section 2): async def stages on an event loop owned by the
stage, `concurrency=` coroutines in flight."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
from _mg_helpers import PYTHON, subprocess_env

import minigun as mg


class InFlight:
    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def hold(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


def test_async_processor_runs_concurrency_coroutines_at_once():
    gauge = InFlight()
    out = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(40)

        @mg.processor(concurrency=8)
        async def fetch(self, x):
            await gauge.hold(0.02)
            return x * 2

        @mg.consumer
        def sink(self, x):
            out.append(x)

    started = time.monotonic()
    Job().run()
    took = time.monotonic() - started
    assert sorted(out) == [2 * x for x in range(40)]
    assert gauge.peak == 8
    assert took < 40 * 0.02 / 2, f"no overlap: {took:.2f}s"


def test_async_default_concurrency_is_one_and_is_capped_by_max_concurrency(mg_caplog):
    gauge = InFlight()

    class Job(mg.Task):
        max_concurrency = 3

        @mg.producer
        def gen(self):
            yield from range(12)

        @mg.processor(concurrency=50)
        async def fetch(self, x):
            await gauge.hold(0.005)

    Job().run()
    assert gauge.peak == 3
    assert sum("fetch" in r.getMessage() for r in mg_caplog.records) == 1

    serial = InFlight()
    p = mg.Pipeline("one")
    p.producer(lambda: range(5), name="gen")

    @p.processor
    async def one_at_a_time(x):
        await serial.hold(0.001)

    p.run()
    assert serial.peak == 1


def test_async_generators_self_emit_and_routing():
    evens, odds = [], []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(6)

        @mg.processor(to=["even", "odd"], concurrency=4)
        async def split(self, x):
            await asyncio.sleep(0)
            self.emit(x, to="even" if x % 2 == 0 else "odd")

        @mg.consumer
        def even(self, x):
            evens.append(x)

        @mg.processor
        async def odd(self, x):
            for k in range(2):
                yield (x, k)

        @mg.consumer(from_="odd")
        def collect_odd(self, v):
            odds.append(v)

    Job().run()
    assert sorted(evens) == [0, 2, 4]
    assert sorted(odds) == [(x, k) for x in (1, 3, 5) for k in range(2)]


def test_async_errors_go_to_on_error_and_retries_emit_once():
    attempts = {}
    out, errors = [], []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(10)

        @mg.processor(concurrency=5, retries=2, retry_on=TimeoutError, retry_backoff=0.001)
        async def flaky(self, x):
            attempts[x] = attempts.get(x, 0) + 1
            self.emit(("early", x))
            if x == 3:
                raise ValueError("bad item")
            if x % 4 == 0 and attempts[x] < 3:
                raise TimeoutError("try again")
            return ("late", x)

        @mg.consumer
        def sink(self, v):
            out.append(v)

        @mg.on_error(ValueError)
        def skip(self, error, item, stage):
            errors.append((item, type(error), stage))

    result = Job().run()
    good = [x for x in range(10) if x != 3]
    assert sorted(out) == sorted((k, x) for k in ("early", "late") for x in good)
    assert errors == [(3, ValueError, "flaky")]
    assert result.stats["flaky"].retries == 3 * 2
    assert result.stats["flaky"].errors == 1


def test_an_unhandled_async_error_fails_the_run():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.processor
        async def boom(self, x):
            raise KeyError(x)

    with pytest.raises(mg.PipelineError) as info:
        Job().run()
    assert isinstance(info.value.__cause__, KeyError)
    assert "boom" in str(info.value)


def test_async_producers_and_accumulator_bodies():
    out = []

    class Job(mg.Task):
        @mg.producer
        async def gen(self):
            for x in range(7):
                await asyncio.sleep(0)
                yield x

        @mg.accumulator(max_size=3)
        async def batch(self, items):
            await asyncio.sleep(0)
            return sum(items)

        @mg.consumer
        def sink(self, total):
            out.append(total)

    Job().run()
    assert sorted(out) == sorted([0 + 1 + 2, 3 + 4 + 5, 6])


def test_async_definition_errors():
    with pytest.raises(mg.DefinitionError, match="async"):

        class Threaded(mg.Task):
            @mg.processor(strategy="threads")
            async def fetch(self, x):
                return x

    with pytest.raises(mg.DefinitionError, match="async def"):

        class Plain(mg.Task):
            @mg.processor(strategy="async")
            def fetch(self, x):
                return x


@pytest.mark.timeout(30)
def test_cancel_stops_coroutines_in_flight_promptly():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(100)

        @mg.processor(concurrency=10)
        async def slow(self, x):
            await asyncio.sleep(30)

    run = Job().start()
    time.sleep(0.2)
    started = time.monotonic()
    run.cancel()
    assert run.wait(timeout=5).status == "cancelled"
    assert time.monotonic() - started < 2


def test_items_that_arrive_while_a_slow_one_runs_start_at_once_and_finish_first():
    """A sliding window across chunks: each item arrives on its own (its own chunk), and
    a slow item holds back nothing but its own slot."""
    finished = []
    gauge = InFlight()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in range(6):
                yield i
                time.sleep(0.02)

        @mg.processor(concurrency=2)
        async def fetch(self, x):
            await gauge.hold(1.0 if x == 0 else 0.01)
            finished.append(x)
            return x

        @mg.consumer
        def sink(self, x):
            pass

    result = Job().run()
    assert finished == [1, 2, 3, 4, 5, 0]
    assert gauge.peak == 2
    assert result.stats["fetch"].items_out == 6


def test_retries_and_failures_that_end_after_later_chunks_arrived_are_counted_once():
    """An item's retries and its failure are reported by whichever call it ends in (its
    back-off outlasts the arrival of later chunks): on_error gets the item, once."""
    attempts: dict[int, int] = {}
    finished = []
    errors = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in range(8):
                yield i
                time.sleep(0.01)

        @mg.processor(concurrency=3, retries=1, retry_backoff=0.3)
        async def fetch(self, x):
            attempts[x] = attempts.get(x, 0) + 1
            if x == 0 or (x == 7 and attempts[x] == 1):
                raise ValueError(f"bad {x}")  # 0 fails twice, 7 once then succeeds
            await asyncio.sleep(0.01)
            finished.append(x)
            return x

        @mg.consumer
        def sink(self, x):
            pass

        @mg.on_error
        def handle(self, error, item, stage):
            errors.append((item, type(error).__name__))

    result = Job().run()
    assert sorted(finished) == [1, 2, 3, 4, 5, 6, 7]
    assert errors == [(0, "ValueError")]
    assert result.stats["fetch"].retries == 2
    assert result.stats["fetch"].errors == 1


def test_import_minigun_leaves_asyncio_unloaded_until_an_async_stage_runs():
    """asyncio (with the ssl it loads) is a quarter of ``import minigun``: a job with no
    async stage does not pay for it."""
    code = (
        "import sys, minigun as mg\n"
        "assert 'asyncio' not in sys.modules, 'import minigun loaded asyncio'\n"
        "class Job(mg.Task):\n"
        "    @mg.producer\n"
        "    def gen(self):\n"
        "        yield 1\n"
        "    @mg.processor\n"
        "    async def double(self, x):\n"
        "        return x * 2\n"
        "    @mg.consumer\n"
        "    def sink(self, x):\n"
        "        print(x)\n"
        "Job().run()\n"
    )
    done = subprocess.run(
        [PYTHON, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2"]


def test_a_base_exception_from_a_coroutine_fails_the_run_instead_of_vanishing():
    class Fatal(BaseException):
        pass

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(5)

        @mg.processor(concurrency=2)
        async def work(self, x):
            if x == 3:
                raise Fatal("boom")
            return x

        @mg.consumer
        def sink(self, x):
            pass

    with pytest.raises(mg.PipelineError, match="Fatal: boom"):
        Job().run()
