"""Nested pipelines (p.pipeline / mg.nested) and custom mg.Stage subclasses (API.md
section 7, with the nested parts of sections 4-6)."""

import collections
import threading
import time

import pytest
from _mg_helpers import Collector, Concurrency, minigun_warnings

import minigun as mg

# ---------------------------------------------------------------------------
# Nested pipelines
# ---------------------------------------------------------------------------


def test_builder_nested_pipeline_is_a_stage_items_flow_through_it():
    out = Collector()
    inner = mg.Pipeline("inner")
    inner.processor(lambda x: x + 1, name="plus_one")
    inner.processor(lambda x: x * 2, name="times_two")

    outer = mg.Pipeline("outer")
    outer.producer(lambda: range(5), name="gen")
    sub = outer.pipeline(inner, name="sub")
    assert isinstance(sub, mg.Stage)
    outer.consumer(lambda x: out.add(x), name="sink")

    result = outer.run()
    assert result.status == "ok"
    assert out.counter() == collections.Counter((x + 1) * 2 for x in range(5))
    assert result.stats["sub.plus_one"].items_in == 5
    assert result.stats["sub.times_two"].items_out == 5


def test_class_dsl_nested_task_class_is_instantiated_and_is_self():
    out = Collector()
    seen_self = Collector()

    class Inner(mg.Task):
        def __init__(self):
            self.offset = 100

        @mg.processor
        def shift(self, x):
            seen_self.add(type(self).__name__)
            return x + self.offset

    class Outer(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        sub = mg.nested(Inner, name="sub")

        @mg.consumer
        def sink(self, x):
            out.add(x)

    result = Outer().run()
    assert out.counter() == collections.Counter([100, 101, 102])
    assert set(seen_self.items) == {"Inner"}
    assert result.stats["sub.shift"].items_in == 3


def test_class_dsl_nested_task_instance_is_used_as_self():
    out = Collector()

    class Inner(mg.Task):
        def __init__(self, factor=1):
            self.factor = factor

        @mg.processor
        def scale(self, x):
            return x * self.factor

    class Outer(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(1, 4)

        sub = mg.nested(Inner(factor=5), name="sub")

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Outer().run()
    assert out.counter() == collections.Counter([5, 10, 15])


def test_two_levels_of_nesting_use_dotted_stats_keys():
    out = Collector()

    class Leaf(mg.Task):
        @mg.processor
        def plus_one(self, x):
            return x + 1

    class Middle(mg.Task):
        leaf = mg.nested(Leaf, name="leaf")

        @mg.processor
        def times_ten(self, x):
            return x * 10

    class Top(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        mid = mg.nested(Middle, name="mid")

        @mg.consumer
        def sink(self, x):
            out.add(x)

    result = Top().run()
    assert out.counter() == collections.Counter((x + 1) * 10 for x in range(4))
    assert result.stats["mid.leaf.plus_one"].items_in == 4
    assert result.stats["mid.times_ten"].items_in == 4


def test_nested_task_hooks_run_when_its_pipeline_starts_and_finishes():
    events = Collector()

    class Inner(mg.Task):
        @mg.processor
        def work(self, x):
            events.add(("inner", x))
            return x

        @mg.before_run
        def inner_start(self):
            events.add("inner:before_run")

        @mg.after_run
        def inner_end(self):
            events.add("inner:after_run")

    class Outer(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        sub = mg.nested(Inner, name="sub")

        @mg.consumer
        def sink(self, x):
            pass

        @mg.before_run
        def outer_start(self):
            events.add("outer:before_run")

        @mg.after_run
        def outer_end(self):
            events.add("outer:after_run")

        @mg.before("sub")
        def before_sub(self):
            events.add("outer:before:sub")

        @mg.after("sub")
        def after_sub(self):
            events.add("outer:after:sub")

    Outer().run()
    ev = events.items
    items = [i for i, e in enumerate(ev) if isinstance(e, tuple)]
    assert len(items) == 3
    for name in (
        "inner:before_run",
        "inner:after_run",
        "outer:before_run",
        "outer:after_run",
        "outer:before:sub",
        "outer:after:sub",
    ):
        assert ev.count(name) == 1, (name, ev)
    assert ev[0] == "outer:before_run"
    assert ev[-1] == "outer:after_run"
    assert ev.index("inner:before_run") < min(items)
    assert ev.index("outer:before:sub") < min(items)
    assert ev.index("inner:after_run") > max(items)
    assert ev.index("outer:after:sub") > max(items)


def test_on_error_innermost_pipeline_is_asked_first_then_outward():
    inner_handled, outer_handled = Collector(), Collector()
    out = Collector()

    class Inner(mg.Task):
        @mg.processor
        def risky(self, x):
            if x == 1:
                raise ValueError("inner value")
            if x == 2:
                raise KeyError("inner key")
            return x

        @mg.on_error(ValueError)
        def inner_handler(self, error, item, stage):
            inner_handled.add((item, type(self).__name__))

    class Outer(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        sub = mg.nested(Inner, name="sub")

        @mg.consumer
        def sink(self, x):
            out.add(x)

        @mg.on_error(ValueError, KeyError)
        def outer_handler(self, error, item, stage):
            outer_handled.add((item, type(self).__name__, type(error).__name__, stage))

    Outer().run()
    assert inner_handled.items == [(1, "Inner")]
    assert len(outer_handled) == 1
    item, owner, etype, stage = outer_handled.items[0]
    assert (item, owner, etype) == (2, "Outer", "KeyError")
    assert isinstance(stage, str) and "risky" in stage
    assert out.counter() == collections.Counter([0, 3])


def test_unhandled_error_in_nested_stage_fails_the_run():
    class Inner(mg.Task):
        @mg.processor
        def inner_boom(self, x):
            raise ValueError("deep")

    class Outer(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        sub = mg.nested(Inner, name="sub")

    with pytest.raises(mg.PipelineError) as info:
        Outer().run()
    assert isinstance(info.value.__cause__, ValueError)
    assert "inner_boom" in str(info.value)
    assert info.value.result.status == "failed"


@pytest.mark.timeout(30)
def test_nested_pipeline_inherits_the_root_limit(mg_caplog):
    conc = Concurrency()

    class Inner(mg.Task):
        @mg.consumer(threads=4)
        def inner_work(self, x):
            with conc:
                time.sleep(0.01)

    class Outer(mg.Task):
        max_threads = 2

        @mg.producer
        def gen(self):
            yield from range(20)

        sub = mg.nested(Inner, name="sub")

    Outer().run()
    assert conc.peak <= 2
    assert len(minigun_warnings(mg_caplog.records, "inner_work")) == 1


@pytest.mark.timeout(30)
def test_limit_set_on_a_nested_pipeline_bounds_that_pipeline(mg_caplog):
    conc = Concurrency()

    class Inner(mg.Task):
        max_threads = 1

        @mg.consumer(threads=3)
        def narrow(self, x):
            with conc:
                time.sleep(0.01)

    class Outer(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(10)

        sub = mg.nested(Inner, name="sub")

    Outer().run()
    assert conc.peak == 1
    assert len(minigun_warnings(mg_caplog.records, "narrow")) == 1


# ---------------------------------------------------------------------------
# Custom mg.Stage subclasses
# ---------------------------------------------------------------------------


class Doubler(mg.Stage):
    def process(self, item):
        return item * 2


def test_custom_stage_added_with_add():
    out = Collector()
    p = mg.Pipeline("custom")
    p.producer(lambda: range(5), name="gen")
    p.add(Doubler("dbl", threads=2))
    p.consumer(lambda x: out.add(x), name="sink")
    result = p.run()
    assert out.counter() == collections.Counter(2 * x for x in range(5))
    assert result.stats["dbl"].items_in == 5


def test_custom_stage_as_class_attribute_in_definition_order():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        dbl = Doubler("dbl")

        @mg.processor
        def plus_one(self, x):
            return x + 1

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert out.items == [1, 3, 5, 7]


def test_custom_stage_emission_rules():
    out = Collector()

    class Fancy(mg.Stage):
        def process(self, item):
            if item == 0:
                return None  # emits nothing
            self.emit(("emitted", item))
            yield ("yielded", item)

    p = mg.Pipeline("custom")
    p.producer(lambda: range(3), name="gen")
    p.add(Fancy("fancy"))
    p.consumer(lambda x: out.add(x), name="sink")
    p.run()
    assert out.counter() == collections.Counter(
        [("emitted", 1), ("yielded", 1), ("emitted", 2), ("yielded", 2)]
    )


def test_custom_stage_return_none_emits_nothing():
    out = Collector()

    class Filter(mg.Stage):
        def process(self, item):
            return item if item % 2 else None

    p = mg.Pipeline("custom")
    p.producer(lambda: range(6), name="gen")
    p.add(Filter("odd_only"))
    p.consumer(lambda x: out.add(x), name="sink")
    p.run()
    assert out.counter() == collections.Counter([1, 3, 5])


def test_custom_stage_close_may_emit():
    out = Collector()

    class Summer(mg.Stage):
        def open(self):
            self.total = 0

        def process(self, item):
            self.total += item

        def close(self):
            self.emit(("total", self.total))

    p = mg.Pipeline("custom")
    p.producer(lambda: range(10), name="gen")
    p.add(Summer("summer"))
    p.consumer(lambda x: out.add(x), name="sink")
    p.run()
    assert out.items == [("total", 45)]


@pytest.mark.timeout(30)
def test_custom_stage_gets_one_copy_per_worker_with_open_and_close_each():
    opened, processed, closed, out = Collector(), Collector(), Collector(), Collector()
    barrier = threading.Barrier(3, timeout=5)

    class Tracking(mg.Stage):
        def open(self):
            self.count = 0
            opened.add(id(self))

        def process(self, item):
            if item < 3:
                barrier.wait()  # three workers busy at once
            self.count += 1  # AttributeError unless open() ran on this copy
            processed.add(id(self))
            return item

        def close(self):
            closed.add((id(self), self.count))
            self.emit(("closed", self.count))

    def gen():
        for i in range(9):
            yield i
            time.sleep(0.03)

    p = mg.Pipeline("custom")
    p.producer(gen, name="gen")
    p.add(Tracking("track", threads=3))
    p.consumer(lambda x: out.add(x), name="sink")
    p.run()

    workers = set(processed.items)
    assert len(workers) == 3
    assert all(n == 1 for n in opened.counter().values()), "open once per copy"
    assert workers <= set(opened.items)
    closed_ids = [i for i, _ in closed.items]
    assert collections.Counter(closed_ids) == collections.Counter(opened.items)
    per_copy = processed.counter()
    assert all(count == per_copy[i] for i, count in closed.items)
    assert sum(count for _, count in closed.items) == 9
    plain = [x for x in out.items if not isinstance(x, tuple)]
    assert sorted(plain) == list(range(9))
    closing = [x for x in out.items if isinstance(x, tuple)]
    assert sorted(c for _, c in closing) == sorted(c for _, c in closed.items)


def test_custom_stage_in_class_dsl_close_emits_per_worker():
    out = Collector()
    barrier = threading.Barrier(2, timeout=5)

    class Summer(mg.Stage):
        def open(self):
            self.total = 0

        def process(self, item):
            if item < 2:
                barrier.wait()
            self.total += item

        def close(self):
            self.emit(self.total)

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in range(6):
                yield i
                time.sleep(0.03)

        summer = Summer("summer", threads=2)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert len(out) == 2
    assert sum(out.items) == sum(range(6))


def test_producers_and_nested_pipelines_are_stages():
    p = mg.Pipeline("kinds")
    s1 = p.producer(lambda: [1], name="gen")
    s2 = p.accumulator(name="acc", max_size=2)
    s3 = p.consumer(lambda x: None, name="sink")
    assert all(isinstance(s, mg.Stage) for s in (s1, s2, s3))


def test_each_worker_runs_a_shallow_copy_of_a_custom_stage():
    opened = Collector()

    class Tagger(mg.Stage):
        def __init__(self, name, shared, **options):
            super().__init__(name, **options)
            self.shared = shared

        def open(self):
            self.mine = []
            opened.add(self)  # the worker itself: kept alive, so no id is reused

        def process(self, item):
            self.mine.append(item)
            self.shared.append(item)

    shared: list[int] = []
    stage = Tagger("tag", shared, threads=3)
    p = mg.Pipeline("copies")
    p.producer(lambda: range(30), name="gen")
    p.add(stage)
    p.run()
    assert sorted(shared) == list(range(30))  # attributes are shared, not deep-copied
    assert len({id(w) for w in opened.items}) == 3
    assert all(w is not stage for w in opened.items)
    assert not hasattr(stage, "mine")  # what a worker sets stays on its copy


def test_a_custom_stage_with_its_own_copy_is_copied_by_it():
    copies = Collector()

    class Counted(mg.Stage):
        def __copy__(self):
            copies.add(1)
            clone = Counted(self.name, threads=self.threads)
            return clone

        def process(self, item):
            return item

    out = Collector()
    p = mg.Pipeline("own_copy")
    p.producer(lambda: range(10), name="gen")
    p.add(Counted("counted", threads=2))
    p.consumer(out.add, name="sink")
    p.run()
    assert len(copies) == 2
    assert sorted(out.items) == list(range(10))


def test_workers_that_add_attributes_while_others_are_copied_all_start():
    """Free-threaded 3.13 before 3.13.6 raised "dict mutated during update" from
    ``copy.copy`` when one worker added an attribute to its copy while another was being
    copied: the copies of one class share a keys table, which only grows while the class
    is new (about 1 run in 20 of these failed)."""
    for _ in range(150):

        class Wide(mg.Stage):
            def open(self):
                for k in range(12):
                    setattr(self, f"field_{k}", k)

            def process(self, item):
                return item + self.field_11

        out = Collector()
        p = mg.Pipeline("wide")
        p.producer(lambda: range(16), name="gen")
        p.add(Wide("wide", threads=4))
        p.consumer(out.add, name="sink")
        assert p.run().status == "ok"
        assert sorted(out.items) == [x + 11 for x in range(16)]
