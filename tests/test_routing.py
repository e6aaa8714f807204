"""Routing (API.md section 1): default sequential edges, to=/from_= edges, fan-out
(broadcast / round_robin), fan-in, several producers, dynamic routing with emit(to=),
name resolution across nested pipelines, and graph validation."""

import collections
import time

import pytest
from _mg_helpers import Collector

import minigun as mg

# ---------------------------------------------------------------------------
# Default routing
# ---------------------------------------------------------------------------


def test_several_producers_defined_first_all_feed_the_first_non_producer():
    first, second = Collector(), Collector()

    class Job(mg.Task):
        @mg.producer
        def numbers(self):
            yield from range(3)

        @mg.producer
        def letters(self):
            yield from "ab"

        @mg.processor
        def tag(self, x):
            first.add(x)
            return ("seen", x)

        @mg.consumer
        def sink(self, x):
            second.add(x)

    result = Job().run()
    assert result.status == "ok"
    assert first.counter() == collections.Counter([0, 1, 2, "a", "b"])
    assert second.counter() == collections.Counter(("seen", x) for x in [0, 1, 2, "a", "b"])


def test_a_producer_is_never_an_implicit_target():
    """gen1 -> a -> b; gen2 (defined between a and b) -> b."""
    at_a, at_b = Collector(), Collector()

    class Job(mg.Task):
        @mg.producer
        def gen1(self):
            yield from range(3)

        @mg.processor
        def a(self, x):
            at_a.add(x)
            return x + 100

        @mg.producer
        def gen2(self):
            yield from [1000, 1001]

        @mg.consumer
        def b(self, x):
            at_b.add(x)

    Job().run()
    assert at_a.counter() == collections.Counter([0, 1, 2])
    assert at_b.counter() == collections.Counter([100, 101, 102, 1000, 1001])


def test_several_producers_run_ends_when_all_drained():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def fast(self):
            yield from range(3)

        @mg.producer
        def slow(self):
            for i in range(3):
                time.sleep(0.05)
                yield 10 + i

        @mg.consumer
        def sink(self, x):
            out.add(x)

    assert Job().run().status == "ok"
    assert out.counter() == collections.Counter([0, 1, 2, 10, 11, 12])


# ---------------------------------------------------------------------------
# Explicit edges
# ---------------------------------------------------------------------------


def test_to_removes_implicit_outgoing_edge_and_target_loses_implicit_incoming():
    """gen -> a (implicit); a -> c (to=); gen -> b (from_=); b -/-> c since c is named in
    a to= and so has no implicit incoming edge."""
    at_b, at_c = Collector(), Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        @mg.processor(to="c")
        def a(self, x):
            return ("a", x)

        @mg.processor(from_="gen")
        def b(self, x):
            at_b.add(x)
            return ("b", x)

        @mg.consumer
        def c(self, x):
            at_c.add(x)

    Job().run()
    # b receives only gen's items (a has no implicit outgoing edge to b) ...
    assert at_b.counter() == collections.Counter(range(4))
    # ... and c only a's outputs (b has no implicit edge into c).
    assert at_c.counter() == collections.Counter(("a", x) for x in range(4))


def test_to_list_fans_out_to_siblings_which_are_not_chained():
    at_left, at_right, at_join = Collector(), Collector(), Collector()

    class Job(mg.Task):
        @mg.producer(to=["left", "right"])
        def gen(self):
            yield from range(5)

        @mg.processor
        def left(self, x):
            at_left.add(x)
            return ("L", x)

        @mg.processor
        def right(self, x):
            at_right.add(x)
            return ("R", x)

        @mg.consumer(from_=["left", "right"])
        def join(self, x):
            at_join.add(x)

    Job().run()
    # broadcast is the default: both siblings see every item, and right never sees left's
    assert at_left.counter() == collections.Counter(range(5))
    assert at_right.counter() == collections.Counter(range(5))
    expected = [("L", x) for x in range(5)] + [("R", x) for x in range(5)]
    assert at_join.counter() == collections.Counter(expected)


def test_from_list_declares_fan_in_edges_by_itself():
    at_join = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor(from_="gen")
        def p1(self, x):
            return x + 10

        @mg.processor(from_="gen")
        def p2(self, x):
            return x + 20

        @mg.consumer(from_=["p1", "p2"])
        def join(self, x):
            at_join.add(x)

    Job().run()
    assert at_join.counter() == collections.Counter([10, 11, 12, 20, 21, 22])


def test_same_edge_declared_from_both_ends_is_one_edge():
    out = Collector()

    class Job(mg.Task):
        @mg.producer(to="a")
        def gen(self):
            yield from range(5)

        @mg.processor(from_="gen", to="sink")
        def a(self, x):
            return x

        @mg.consumer(from_="a")
        def sink(self, x):
            out.add(x)

    Job().run()
    assert out.counter() == collections.Counter(range(5))


def test_to_accepts_a_single_string_or_a_list():
    out = Collector()

    class Job(mg.Task):
        @mg.producer(to=["skip_to"])
        def gen(self):
            yield from range(3)

        @mg.consumer(to="skip_to", from_=["gen"])
        def unused_side(self, x):
            return None

        @mg.consumer
        def skip_to(self, x):
            out.add(x)

    Job().run()
    # gen broadcasts to skip_to (declared) and unused_side (its from_); unused_side emits nothing
    assert out.counter() == collections.Counter(range(3))


# ---------------------------------------------------------------------------
# Fan-out modes and fan-in
# ---------------------------------------------------------------------------


def test_broadcast_sends_every_item_to_every_downstream():
    a, b, c = Collector(), Collector(), Collector()

    class Job(mg.Task):
        @mg.producer(to=["s1", "s2", "s3"], routing="broadcast")
        def gen(self):
            yield from range(10)

        @mg.consumer
        def s1(self, x):
            a.add(x)

        @mg.consumer
        def s2(self, x):
            b.add(x)

        @mg.consumer
        def s3(self, x):
            c.add(x)

    Job().run()
    for col in (a, b, c):
        assert col.counter() == collections.Counter(range(10))


def test_round_robin_sends_each_item_to_exactly_one_downstream():
    a, b = Collector(), Collector()

    class Job(mg.Task):
        @mg.producer(to=["s1", "s2"], routing="round_robin")
        def gen(self):
            yield from range(100)

        @mg.consumer
        def s1(self, x):
            a.add(x)

        @mg.consumer
        def s2(self, x):
            b.add(x)

    Job().run()
    assert a.counter() + b.counter() == collections.Counter(range(100))
    assert len(a) > 0 and len(b) > 0, "round_robin load-balances over its downstreams"


def test_round_robin_on_a_processor_with_threads():
    a, b = Collector(), Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(60)

        @mg.processor(threads=3, to=["s1", "s2"], routing="round_robin")
        def work(self, x):
            return x * 2

        @mg.consumer
        def s1(self, x):
            a.add(x)

        @mg.consumer
        def s2(self, x):
            b.add(x)

    Job().run()
    assert a.counter() + b.counter() == collections.Counter(2 * x for x in range(60))


def test_fan_in_stage_finishes_only_after_all_upstreams():
    batches = Collector()

    class Job(mg.Task):
        @mg.producer
        def fast(self):
            yield from range(5)

        @mg.producer
        def slow(self):
            for i in range(5):
                time.sleep(0.03)
                yield 100 + i

        @mg.accumulator(max_size=1000)
        def gather(self, items):
            return items

        @mg.consumer
        def sink(self, batch):
            batches.add(sorted(batch))

    Job().run()
    # One batch, flushed at the end of gather's stream: which ends only after *both*
    # upstreams finished.
    assert batches.items == [[0, 1, 2, 3, 4, 100, 101, 102, 103, 104]]


def test_fan_in_after_fan_out_diamond_delivers_both_paths():
    out = Collector()

    class Job(mg.Task):
        @mg.producer(to=["a", "b"])
        def gen(self):
            yield from range(10)

        @mg.processor(threads=2)
        def a(self, x):
            time.sleep(0.001)
            return ("a", x)

        @mg.processor
        def b(self, x):
            return ("b", x)

        @mg.accumulator(from_=["a", "b"], max_size=10_000)
        def join(self, items):
            return items

        @mg.consumer
        def sink(self, batch):
            for x in batch:
                out.add(x)

    Job().run()
    expected = [("a", x) for x in range(10)] + [("b", x) for x in range(10)]
    assert out.counter() == collections.Counter(expected)


# ---------------------------------------------------------------------------
# Dynamic routing
# ---------------------------------------------------------------------------


def test_emit_to_routes_each_value_to_the_named_downstream():
    even_items, odd_items = Collector(), Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(10)

        @mg.processor(to=["evens", "odds"])
        def splitter(self, x):
            self.emit(x, to="evens" if x % 2 == 0 else "odds")

        @mg.consumer
        def evens(self, x):
            even_items.add(x)

        @mg.consumer
        def odds(self, x):
            odd_items.add(x)

    Job().run()
    assert even_items.counter() == collections.Counter([0, 2, 4, 6, 8])
    assert odd_items.counter() == collections.Counter([1, 3, 5, 7, 9])


def test_emit_to_the_implicit_next_stage_is_allowed():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor
        def fwd(self, x):
            self.emit(x * 5, to="next_stage")

        @mg.consumer
        def next_stage(self, x):
            out.add(x)

    Job().run()
    assert out.counter() == collections.Counter([0, 5, 10])


def test_emit_to_with_round_robin_still_honours_explicit_target():
    left_items, right_items = Collector(), Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(20)

        @mg.processor(to=["left", "right"], routing="round_robin")
        def splitter(self, x):
            self.emit(x, to="left")

        @mg.consumer
        def left(self, x):
            left_items.add(x)

        @mg.consumer
        def right(self, x):
            right_items.add(x)

    Job().run()
    assert left_items.counter() == collections.Counter(range(20))
    assert right_items.items == []


def test_emit_to_an_existing_but_undeclared_stage_raises_routing_error():
    errors = Collector()
    delivered = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor(to="left_sink")
        def splitter(self, x):
            try:
                self.emit(x, to="right_sink")
            except mg.RoutingError as exc:
                errors.add(exc)
            return x

        @mg.consumer
        def left_sink(self, x):
            delivered.add(("left", x))

        @mg.consumer(from_="gen")
        def right_sink(self, x):
            delivered.add(("right", x))

    Job().run()
    assert len(errors) == 3
    exc = errors.items[0]
    assert isinstance(exc, mg.MinigunError)
    msg = str(exc)
    assert "splitter" in msg and "right_sink" in msg, msg
    assert "to=" in msg, "the message suggests declaring the edge with to=[...]"
    # nothing sent by the failed emits reached right_sink from splitter
    assert delivered.counter() == collections.Counter(
        [("left", x) for x in range(3)] + [("right", x) for x in range(3)]
    )


def test_emit_to_an_unknown_name_raises_routing_error():
    errors = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.processor
        def splitter(self, x):
            try:
                self.emit(x, to="no_such_stage_anywhere")
            except mg.RoutingError as exc:
                errors.add(exc)

        @mg.consumer
        def sink(self, x):
            pass

    Job().run()
    assert len(errors) == 1
    assert "splitter" in str(errors.items[0])


def test_unhandled_routing_error_fails_the_run():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.processor
        def splitter(self, x):
            self.emit(x, to="nowhere_at_all")

        @mg.consumer
        def sink(self, x):
            pass

    with pytest.raises(mg.PipelineError) as info:
        Job().run()
    assert isinstance(info.value.__cause__, mg.RoutingError)


# ---------------------------------------------------------------------------
# Name resolution across nested pipelines
# ---------------------------------------------------------------------------


def test_dotted_name_reaches_into_a_nested_pipeline():
    inner_b, tapped = Collector(), Collector()

    class Inner(mg.Task):
        @mg.processor
        def a(self, x):
            return x + 1

        @mg.consumer
        def b(self, x):
            inner_b.add(x)

    class Outer(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        sub = mg.nested(Inner, name="sub")

        @mg.consumer(from_="sub.a")
        def tap(self, x):
            tapped.add(x)

    result = Outer().run()
    assert result.status == "ok"
    # sub.a now has two downstreams (sub.b and tap): broadcast to both
    assert inner_b.counter() == collections.Counter([1, 2, 3, 4])
    assert tapped.counter() == collections.Counter([1, 2, 3, 4])


def test_names_resolve_locally_first_then_outward():
    inner_fin, outer_fin, outer_side = Collector(), Collector(), Collector()

    class Inner(mg.Task):
        @mg.processor(to=["fin", "side"])  # "fin" is local, "side" is in the outer pipeline
        def split(self, x):
            return x

        @mg.processor
        def fin(self, x):
            inner_fin.add(x)
            return x * 10

    class Outer(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        sub = mg.nested(Inner, name="sub")

        @mg.consumer
        def fin(self, x):
            outer_fin.add(x)

        @mg.consumer
        def side(self, x):
            outer_side.add(x)

    result = Outer().run()
    assert inner_fin.counter() == collections.Counter([0, 1, 2])
    assert outer_fin.counter() == collections.Counter([0, 10, 20])
    assert outer_side.counter() == collections.Counter([0, 1, 2])
    assert result.stats["sub.fin"].items_in == 3
    assert result.stats["fin"].items_in == 3


def test_name_found_in_exactly_one_nested_pipeline_resolves_to_it():
    tapped = Collector()

    class Inner(mg.Task):
        @mg.processor
        def common(self, x):
            return x + 1

    class Outer(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        one = mg.nested(Inner, name="one")

        @mg.consumer(from_="common")
        def tap(self, x):
            tapped.add(x)

    assert Outer().run().status == "ok"
    assert tapped.counter() == collections.Counter([1, 2, 3])


def test_name_found_only_in_several_nested_pipelines_is_ambiguous():
    class Inner(mg.Task):
        @mg.processor
        def common(self, x):
            return x

    with pytest.raises(mg.DefinitionError):

        class Outer(mg.Task):
            @mg.producer
            def gen(self):
                yield 1

            one = mg.nested(Inner, name="one")
            two = mg.nested(Inner, name="two")

            @mg.consumer(from_="common")
            def tap(self, x):
                pass

        Outer().run()


# ---------------------------------------------------------------------------
# Graph validation (before anything runs)
# ---------------------------------------------------------------------------


def _assert_definition_error_before_running(build):
    started = Collector()
    with pytest.raises(mg.DefinitionError):
        Job = build(started)
        Job().run()
    assert started.items == [], "nothing runs when the graph is invalid"


def test_cycle_is_a_definition_error():
    def build(started):
        class Job(mg.Task):
            @mg.producer(to="a")
            def gen(self):
                started.add("gen")
                yield 1

            @mg.processor(to="b")
            def a(self, x):
                return x

            @mg.processor(to=["a", "sink"])
            def b(self, x):
                return x

            @mg.consumer
            def sink(self, x):
                pass

        return Job

    _assert_definition_error_before_running(build)


def test_to_naming_no_stage_is_a_definition_error():
    def build(started):
        class Job(mg.Task):
            @mg.producer(to="missing")
            def gen(self):
                started.add("gen")
                yield 1

            @mg.consumer
            def sink(self, x):
                pass

        return Job

    _assert_definition_error_before_running(build)


def test_from_naming_no_stage_is_a_definition_error():
    def build(started):
        class Job(mg.Task):
            @mg.producer
            def gen(self):
                started.add("gen")
                yield 1

            @mg.consumer(from_=["gen", "missing"])
            def sink(self, x):
                pass

        return Job

    _assert_definition_error_before_running(build)


def test_stage_no_producer_can_reach_is_a_definition_error():
    def build(started):
        class Job(mg.Task):
            @mg.producer(to="b")
            def gen(self):
                started.add("gen")
                yield 1

            @mg.processor
            def orphan(self, x):  # gen skips it and b is a to= target: no way in
                return x

            @mg.consumer
            def b(self, x):
                pass

        return Job

    _assert_definition_error_before_running(build)


def test_unknown_strategy_is_a_definition_error_before_running():
    def build(started):
        class Job(mg.Task):
            @mg.producer
            def gen(self):
                started.add("gen")
                yield 1

            @mg.consumer(strategy="warp-drive")
            def sink(self, x):
                pass

        return Job

    _assert_definition_error_before_running(build)
