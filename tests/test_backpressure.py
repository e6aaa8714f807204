"""Back-pressure and bounded memory (API.md section 3, queue_size).

A fast producer must be held back by a slow consumer: how far the producer runs ahead of
the consumer is bounded by the queue capacities along the path (plus the chunks in hand).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minigun as mg


class Lead:
    """Tracks how far production runs ahead of consumption."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.produced = 0
        self.consumed = 0
        self.max_lead = 0

    def made(self) -> None:
        with self.lock:
            self.produced += 1
            self.max_lead = max(self.max_lead, self.produced - self.consumed)

    def used(self) -> None:
        with self.lock:
            self.consumed += 1


def slack(queue_size: int) -> int:
    """Items beyond a one-worker stage's queue: what it holds in hand (a chunk, with the
    chunks queued behind it merged in: under two chunks) and the chunk its sender's outbox
    fills. A chunk to one worker carries at most half its queue (docs/architecture.md,
    "Chunk size adapts")."""
    return 3 * max(1, queue_size // 2)


def _chain(lead: Lead, n: int, sizes: list[int], delay: float) -> mg.Pipeline:
    p = mg.Pipeline("bp")

    @p.producer
    def gen():
        for i in range(n):
            lead.made()
            yield i

    for k, size in enumerate(sizes[:-1]):
        p.processor(lambda x: x, name=f"hop{k}", queue_size=size)

    @p.consumer(queue_size=sizes[-1])
    def slow(x):
        time.sleep(delay)
        lead.used()

    return p


def test_slow_consumer_throttles_a_fast_producer():
    lead = Lead()
    _chain(lead, 300, [10], 0.001).run()
    assert lead.consumed == 300
    assert lead.max_lead <= 10 + slack(10) + 1, lead.max_lead


def test_unbounded_queue_must_be_asked_for_and_lets_the_producer_run_ahead():
    lead = Lead()
    _chain(lead, 300, [None], 0.001).run()
    assert lead.consumed == 300
    assert lead.max_lead > 200, "queue_size=None is unbounded"


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3))
def test_lead_is_bounded_by_the_queues_along_the_path(sizes):
    lead = Lead()
    _chain(lead, 150, sizes, 0.0005).run()
    assert lead.consumed == 150
    bound = sum(size + slack(size) for size in sizes) + 1
    assert lead.max_lead <= bound, (lead.max_lead, bound)


class Tracked:
    """An item that counts how many of its kind are alive, and the most ever alive."""

    lock = threading.Lock()
    alive = 0
    peak = 0

    def __init__(self) -> None:
        with Tracked.lock:
            Tracked.alive += 1
            Tracked.peak = max(Tracked.peak, Tracked.alive)

    def __del__(self) -> None:
        with Tracked.lock:
            Tracked.alive -= 1


@pytest.mark.parametrize("hop", ["passes the item on", "makes a new item"])
def test_items_a_stage_is_done_with_are_released_as_the_run_goes(hop):
    # On free-threaded builds a stage hands the items it is done with back to the worker
    # that sent them, to be released there: they must not pile up until the run ends.
    Tracked.alive = Tracked.peak = 0
    n, size = 20_000, 50
    p = mg.Pipeline("release")
    p.producer(lambda: (Tracked() for _ in range(n)), name="make")
    if hop == "passes the item on":
        p.processor(lambda item: item, name="hop", queue_size=size)
    else:
        p.processor(lambda item: Tracked(), name="hop", queue_size=size)
    seen = []
    p.consumer(lambda item: seen.append(None), name="sink", queue_size=size)
    assert p.run().status == "ok"
    assert len(seen) == n
    in_flight = 2 * (size + slack(size))
    assert Tracked.peak <= 4 * in_flight, (Tracked.peak, in_flight)
    assert Tracked.alive == 0, f"{Tracked.alive} items still alive after the run"


MEMORY_JOB = textwrap.dedent(
    """
    import resource, sys
    import minigun as mg

    n = int(sys.argv[1])
    total = 0
    p = mg.Pipeline("mem")

    @p.producer
    def records():
        for i in range(n):
            yield f"{i:010d}" * 30          # a fresh 300-byte string per item

    p.accumulator(name="batch", max_size=1000)

    @p.consumer
    def count(batch):
        global total
        total += len(batch)

    p.run()
    assert total == n, total
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def _peak_rss_kib(n: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_JOB, str(n)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout.strip())


def test_peak_memory_does_not_grow_with_the_number_of_items():
    small = _peak_rss_kib(100_000)
    large = _peak_rss_kib(1_000_000)
    # 10x the items (about 300 MB of strings pass through) must not need more memory:
    # allow 10% plus 8 MiB of allocator noise.
    assert large <= small * 1.10 + 8 * 1024, (small, large)
