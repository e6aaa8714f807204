"""Accumulators (API.md sections 1 and 3): max_size, max_wait, key=, accumulator_max_all,
accumulator_check_interval, end-of-stream flush, and the one-worker rule."""

import collections
import threading

import pytest
from _mg_helpers import Collector

import minigun as mg


def _flatten(batches):
    return [x for b in batches for x in b]


def test_max_size_batches_in_arrival_order_with_final_partial_batch():
    batches = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(10)

        @mg.accumulator(max_size=3)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    assert batches.items == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_default_max_size_is_accumulator_max_single():
    batches = Collector()

    class Job(mg.Task):
        accumulator_max_single = 4

        @mg.producer
        def gen(self):
            yield from range(10)

        batch = mg.accumulator("batch")

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    assert batches.items == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_everything_left_is_flushed_at_end_of_stream():
    batches = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(5)

        @mg.accumulator(max_size=100)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    assert batches.items == [[0, 1, 2, 3, 4]]


def test_empty_stream_emits_no_batch():
    batches = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            return []

        @mg.accumulator(max_size=3)
        def batch(self, items):
            batches.add(("body", list(items)))
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(("sink", list(b)))

    assert Job().run().status == "ok"
    assert batches.items == []


def test_no_item_lost_or_duplicated_with_threaded_upstream():
    batches = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(500)

        @mg.processor(threads=4)
        def work(self, x):
            return x

        @mg.accumulator(max_size=7)
        def batch(self, items):
            return items

        @mg.consumer(threads=2)
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    assert all(1 <= len(b) <= 7 for b in batches.items)
    assert sorted(_flatten(batches.items)) == list(range(500))


def test_key_groups_items_and_flushes_each_key_at_max_size():
    batches = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(12)

        @mg.accumulator(max_size=2, key=lambda x: x % 3)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(tuple(b))

    Job().run()
    assert sorted(batches.items) == [(0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11)]


def test_key_on_bodyless_accumulator():
    batches = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from ["apple", "avocado", "banana", "blueberry", "cherry", "apricot"]

        by_letter = mg.accumulator("by_letter", max_size=10, key=lambda s: s[0])

        @mg.consumer
        def sink(self, b):
            batches.add(tuple(b))

    Job().run()
    assert sorted(batches.items) == [
        ("apple", "avocado", "apricot"),
        ("banana", "blueberry"),
        ("cherry",),
    ]


@pytest.mark.timeout(30)
def test_max_wait_flushes_a_partial_batch_without_new_items():
    batches = Collector()
    first_batch = threading.Event()
    flushed_while_waiting = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1
            yield 2
            # No more items until the partial batch came through on its own.
            flushed_while_waiting.append(first_batch.wait(5))
            yield 3

        @mg.accumulator(max_size=100, max_wait=0.3)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))
            first_batch.set()

    Job().run()
    assert flushed_while_waiting == [True]
    assert batches.items == [[1, 2], [3]]


@pytest.mark.timeout(30)
def test_max_wait_applies_per_key():
    batches = Collector()
    flushed_while_waiting = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 0
            yield 1
            flushed_while_waiting.append(batches.wait_for(2, timeout=5))
            yield 2

        @mg.accumulator(max_size=100, max_wait=0.2, key=lambda x: x % 2)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    assert flushed_while_waiting == [True]
    assert sorted(batches.items[:2]) == [[0], [1]]
    assert batches.items[2:] == [[2]]


def _run_with_a_producer_that_waits(first, max_size, batches_awaited, timeout):
    """producer -> accumulator(max_size) -> consumer. The producer yields ``first``, then
    waits inside its function (up to ``timeout`` seconds) for ``batches_awaited`` batches
    to reach the consumer, then yields ``"last"``. Returns whether they did, and every
    batch."""
    batches = Collector()
    arrived_while_waiting = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from first
            arrived_while_waiting.append(batches.wait_for(batches_awaited, timeout=timeout))
            yield "last"

        @mg.accumulator(max_size=max_size)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    return arrived_while_waiting, batches.items


@pytest.mark.timeout(30)
def test_full_batches_go_on_while_the_producer_waits_inside_its_function():
    # Not at the producer's next item, nor at the end of the stream.
    arrived, batches = _run_with_a_producer_that_waits(range(10), 5, 2, timeout=5)
    assert arrived == [True]
    assert batches == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], ["last"]]


def test_without_max_wait_a_partial_batch_waits_for_the_end_of_stream():
    arrived, batches = _run_with_a_producer_that_waits([1], 100, 1, timeout=0.5)
    assert arrived == [False]
    assert batches == [[1, "last"]]


@pytest.mark.timeout(30)
def test_max_all_flushes_the_largest_batches_first():
    batches = Collector()
    early = []

    class Job(mg.Task):
        accumulator_max_all = 5
        accumulator_check_interval = 1

        @mg.producer
        def gen(self):
            yield from [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("c", 0)]
            # 6 items held > 5: the largest batch (key "a", 4 items) must be flushed now.
            early.append(batches.wait_for(1, timeout=5))
            yield ("b", 1)

        @mg.accumulator(max_size=100, key=lambda item: item[0])
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(tuple(b))

    Job().run()
    assert early == [True]
    assert batches.items[0] == (("a", 0), ("a", 1), ("a", 2), ("a", 3))
    assert sorted(batches.items[1:]) == [(("b", 0), ("b", 1)), (("c", 0),)]


def test_max_all_applies_without_key():
    batches = Collector()

    class Job(mg.Task):
        accumulator_max_all = 5
        accumulator_check_interval = 1

        @mg.producer
        def gen(self):
            yield from range(20)

        @mg.accumulator(max_size=100)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    # checked after every item: never more than max_all + 1 held
    assert len(batches.items) >= 3
    assert all(len(b) <= 6 for b in batches.items)
    assert _flatten(batches.items) == list(range(20))


def test_max_all_is_only_checked_every_check_interval_items():
    batches = Collector()

    class Job(mg.Task):
        accumulator_max_all = 5
        accumulator_check_interval = 10

        @mg.producer
        def gen(self):
            yield from range(20)

        @mg.accumulator(max_size=100)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    sizes = [len(b) for b in batches.items]
    assert len(sizes) >= 2, "max_all flushed before the end of the stream"
    assert max(sizes) > 6, "held items are not checked after every item"
    assert max(sizes) <= 15
    assert _flatten(batches.items) == list(range(20))


def test_max_size_still_applies_per_key_under_max_all():
    batches = Collector()

    class Job(mg.Task):
        accumulator_max_all = 1000

        @mg.producer
        def gen(self):
            yield from range(30)

        @mg.accumulator(max_size=4, key=lambda x: x % 2)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    assert all(len(b) <= 4 for b in batches.items)
    assert all(len({x % 2 for x in b}) == 1 for b in batches.items)
    assert sorted(_flatten(batches.items)) == list(range(30))
    # every key's items stay in arrival order
    evens = _flatten(b for b in batches.items if b[0] % 2 == 0)
    odds = _flatten(b for b in batches.items if b[0] % 2 == 1)
    assert evens == list(range(0, 30, 2))
    assert odds == list(range(1, 30, 2))


# ---------------------------------------------------------------------------
# One worker, in the pipeline's process
# ---------------------------------------------------------------------------


def test_accumulator_with_more_than_one_thread_is_a_definition_error():
    with pytest.raises(mg.DefinitionError):

        class Bad(mg.Task):
            @mg.producer
            def gen(self):
                yield 1

            @mg.accumulator(max_size=2, threads=2)
            def batch(self, items):
                return items

        Bad().run()


def test_bodyless_accumulator_with_threads_is_a_definition_error():
    with pytest.raises(mg.DefinitionError):

        class Bad(mg.Task):
            @mg.producer
            def gen(self):
                yield 1

            batch = mg.accumulator("batch", max_size=2, threads=3)

        Bad().run()


@pytest.mark.parametrize("strategy", ["threads", "inline"])
def test_accumulator_with_a_strategy_is_a_definition_error(strategy):
    with pytest.raises(mg.DefinitionError):

        class Bad(mg.Task):
            @mg.producer
            def gen(self):
                yield 1

            @mg.accumulator(max_size=2, strategy=strategy)
            def batch(self, items):
                return items

        Bad().run()


def test_accumulator_with_one_thread_is_fine():
    batches = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        @mg.accumulator(max_size=2, threads=1)
        def batch(self, items):
            return items

        @mg.consumer
        def sink(self, b):
            batches.add(list(b))

    Job().run()
    assert batches.items == [[0, 1], [2, 3]]


def test_accumulator_runs_on_a_thread_of_this_process():
    import os

    where = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.accumulator(max_size=2)
        def batch(self, items):
            where.add(os.getpid())
            return items

        @mg.consumer
        def sink(self, b):
            pass

    Job().run()
    assert set(where.items) == {os.getpid()}
    assert collections.Counter(where.items)[os.getpid()] == 2


class _Record:
    """Notes the thread that releases it."""

    __slots__ = ("released_on",)

    def __init__(self, released_on: list[int]) -> None:
        self.released_on = released_on

    def __del__(self) -> None:
        self.released_on.append(threading.get_ident())


@pytest.mark.parametrize("body", [False, True], ids=["bodyless", "with a processor"])
def test_the_records_of_spent_batches_are_released_by_the_thread_that_made_them(body):
    # A batch's records were made by the producer; once the stage behind the accumulator
    # is done with a batch, it goes back (through the accumulator) to the producer's
    # thread, which releases the records just before it makes the next ones (W4's speed;
    # docs/performance.md). A small queue keeps the producer running while batches come
    # back; the last ones come back after it ended and are released elsewhere.
    released_on: list[int] = []
    producer_thread = []
    seen = []

    def records():
        producer_thread.append(threading.get_ident())
        for _ in range(5000):
            yield _Record(released_on)

    p = mg.Pipeline("p")
    p.producer(records, name="records")
    p.accumulator(name="batch", max_size=50, queue_size=100)
    if body:
        p.processor(lambda batch: batch, name="pass", queue_size=2)
    p.consumer(lambda batch: seen.append(len(batch)), name="sink", queue_size=2)
    assert p.run().status == "ok"
    assert sum(seen) == 5000 and len(released_on) == 5000
    by_producer = released_on.count(producer_thread[0])
    assert by_producer >= 2500, f"{by_producer} of 5,000 released by the producer's thread"
