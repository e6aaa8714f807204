"""``strategy="inline"``: the scheduler itself, one item at a time (API.md section 2).

An inline stage whose only input comes from a stage with one runtime thread runs on that
thread, item by item as it is sent; otherwise it has a thread of its own and takes one
item at a time from its queue. Either way it keeps the item contract (the conformance
matrix runs "inline" through every scenario and stage form); these tests pin down where
it runs, and what running inside its sender must not change.
"""

from __future__ import annotations

import threading
import time

import pytest
from _mg_helpers import Collector, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

import minigun as mg


def _thread_of(seen: Collector, tag: str):
    """A stage function recording the thread it runs on, passing items through."""

    def record(x):
        seen.add((tag, threading.get_ident()))
        return x

    return record


def test_an_inline_chain_behind_a_producer_runs_on_the_producers_thread():
    seen = Collector()
    out = Collector()

    def numbers():
        for i in range(500):
            seen.add(("producer", threading.get_ident()))
            yield i

    p = mg.Pipeline("p")
    p.producer(numbers, name="numbers")
    p.processor(_thread_of(seen, "first"), name="first", strategy="inline")
    p.processor(_thread_of(seen, "second"), name="second", strategy="inline")
    p.consumer(out.add, name="sink", strategy="inline")
    result = p.run()
    # One item at a time, on one thread: every item arrives, in the order it was made.
    assert out.items == list(range(500))
    threads = {tag: {t for tg, t in seen.items if tg == tag} for tag in ("producer", "first")}
    assert len(threads["producer"]) == 1
    assert threads["first"] == threads["producer"]
    assert {t for tag, t in seen.items if tag == "second"} == threads["producer"]
    for name in ("first", "second", "sink"):
        stats = result.stats[name]
        assert stats.items_in == 500, (name, stats)
        # Taken one at a time: each item is its own chunk, and there is no queue.
        assert stats.chunks_in == 500, (name, stats)
        assert stats.queue_size is None, (name, stats)
        assert stats.latency_p99 > 0, (name, stats)


@pytest.mark.parametrize(
    "feeding",
    [
        pytest.param({"threads": 3}, id="a-stage-with-several-threads"),
        pytest.param({"strategy": "spawn_thread"}, id="a-thread-per-item"),
    ],
)
def test_an_inline_stage_fed_by_several_threads_still_takes_one_item_at_a_time(feeding):
    inside = 0
    peak = 0
    lock = threading.Lock()
    out = Collector()

    def one_at_a_time(x):
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.0005)
        with lock:
            inside -= 1
        out.add(x)

    p = mg.Pipeline("p")
    p.producer(lambda: range(200), name="numbers")
    p.processor(lambda x: x, name="spread", **feeding)
    p.consumer(one_at_a_time, name="sink", strategy="inline")
    p.run()
    assert sorted(out.items) == list(range(200))
    assert peak == 1


def test_an_inline_stage_with_two_senders_gets_a_thread_of_its_own():
    seen = Collector()
    out = Collector()
    p = mg.Pipeline("p")
    p.producer(lambda: range(100), name="low", to="merge")
    p.producer(lambda: range(100, 200), name="high", to="merge")
    p.processor(_thread_of(seen, "merge"), name="merge", strategy="inline")
    p.consumer(out.add, name="sink")
    p.run()
    assert sorted(out.items) == list(range(200))
    assert len({t for _, t in seen.items}) == 1


def test_emit_inside_an_inline_stage_and_inside_its_sender_each_reach_their_own_stages():
    """The inline stage runs inside its sender's ``emit()``: each call must still go to the
    downstream stages of the stage that made it."""
    merged = Collector()
    counted = Collector()

    def numbers():
        for i in range(50):
            mg.emit(i, to="split")
            mg.emit(-i - 1, to="count")
        yield from ()

    def split(x):
        mg.emit(("even" if x % 2 == 0 else "odd", x), to="merged")
        mg.emit(x * 10, to="merged")

    p = mg.Pipeline("p")
    p.producer(numbers, name="numbers", to=["split", "count"])
    p.processor(split, name="split", strategy="inline", to="merged")
    p.consumer(merged.add, name="merged")
    p.consumer(counted.add, name="count")
    p.run()
    assert sorted(counted.items) == list(range(-50, 0))
    expected = [("even" if x % 2 == 0 else "odd", x) for x in range(50)] + [
        x * 10 for x in range(50)
    ]
    assert sorted(merged.items, key=repr) == sorted(expected, key=repr)


def test_a_custom_inline_stage_is_opened_before_its_first_item_and_closed_after_its_last():
    events = Collector()
    out = Collector()

    class Summing(mg.Stage):
        def open(self):
            self.total = 0
            events.add("open")

        def process(self, item):
            if self.total == 0:
                events.add("first item")
            self.total += item

        def close(self):
            events.add("close")
            self.emit(self.total)

    def numbers():
        yield from range(1, 101)
        events.add("numbers made")

    p = mg.Pipeline("p")
    p.producer(numbers, name="numbers")
    p.add(Summing("summing", strategy="inline"))
    p.consumer(out.add, name="sink")

    @p.after("summing")
    def _summing_done():
        events.add("summing finished")

    p.run()
    assert out.items == [5050]
    # The order a stage with a thread of its own sees: its input ends, it closes, it ends.
    assert events.items == ["open", "first item", "numbers made", "close", "summing finished"]


def test_a_failed_item_of_an_inline_stage_reaches_on_error_and_the_rest_go_on():
    failed = Collector()
    out = Collector()
    attempts = Collector()

    def picky(x):
        attempts.add(x)
        if x % 10 == 3:
            mg.emit(("poison", x))
            raise ValueError(f"no {x}")
        return x

    p = mg.Pipeline("p")
    p.producer(lambda: range(50), name="numbers")
    p.processor(picky, name="picky", strategy="inline", retries=2, retry_backoff=0.001)
    p.consumer(out.add, name="sink")

    @p.on_error
    def _take(error, item, stage):
        failed.add((stage, item, type(error).__name__))

    result = p.run()
    assert sorted(out.items) == [x for x in range(50) if x % 10 != 3]
    assert sorted(failed.items) == [("picky", x, "ValueError") for x in (3, 13, 23, 33, 43)]
    assert attempts.counter()[13] == 3
    assert result.stats["picky"].retries == 10
    assert result.stats["picky"].errors == 5


def test_an_unhandled_failure_in_an_inline_stage_stops_its_endless_sender():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    def breaks(x):
        if x == 1000:
            raise KeyError(x)

    p = mg.Pipeline("p")
    p.producer(endless, name="numbers")
    p.consumer(breaks, name="breaks", strategy="inline")
    with pytest.raises(mg.PipelineError) as raised:
        p.run()
    assert isinstance(raised.value.__cause__, KeyError)
    assert "breaks" in str(raised.value)


def test_an_untriggered_producer_with_an_inline_stage_behind_it_ends_when_cancelled():
    out = Collector()
    p = mg.Pipeline("p")
    p.producer(lambda: range(3), name="now", to="sink")
    p.producer(lambda: range(3), name="later", to="tail", auto_start=False)
    p.consumer(out.add, name="sink")
    p.consumer(out.add, name="tail", strategy="inline")
    run = p.start()
    assert wait_until(lambda: len(out) == 3)
    run.cancel()
    result = run.wait(timeout=5)
    assert result.status == "cancelled"


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 300),
    chain=st.lists(st.sampled_from(["inline", "threads", "one thread"]), min_size=1, max_size=4),
)
def test_a_chain_with_inline_stages_delivers_every_item_once_in_order_where_it_can(n, chain):
    """Every item exactly once; in order when no stage has several threads."""
    out = Collector()
    p = mg.Pipeline("p")
    p.producer(lambda: range(n), name="numbers")
    for i, kind in enumerate(chain):
        options = (
            {"strategy": "inline"}
            if kind == "inline"
            else {"threads": 1 if kind == "one thread" else 3}
        )
        p.processor(lambda x, i=i: x + 1, name=f"s{i}", **options)
    p.consumer(out.add, name="sink", strategy="inline")
    p.run()
    expected = [x + len(chain) for x in range(n)]
    if "threads" in chain:
        assert sorted(out.items) == expected
    else:
        assert out.items == expected
