"""Properties of the runtime itself: the free-threaded build, chunking, stats."""

from __future__ import annotations

import sys
import threading
import time

import pytest

import minigun as mg

free_threaded = pytest.mark.skipif(
    getattr(sys, "_is_gil_enabled", lambda: True)(), reason="needs a free-threaded CPython"
)


@free_threaded
def test_importing_minigun_keeps_the_gil_off():
    import minigun._minigun  # noqa: F401

    assert sys._is_gil_enabled() is False


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
        deadline = time.perf_counter() + 0.05
        while time.perf_counter() < deadline:
            pass
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
