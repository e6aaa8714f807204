"""Builder API (API.md section 7): mg.Pipeline, its stage methods as calls and decorators,
accumulators, builder hooks with plain functions, mg.emit / mg.trigger, config=."""

import collections
import functools
import gc
import inspect
import threading
import time

import pytest
from _mg_helpers import Collector, Concurrency, minigun_warnings

import minigun as mg


def test_builder_methods_take_the_function_first_and_return_stages():
    out = Collector()

    def numbers():
        yield from range(5)

    def double(x):
        return x * 2

    def sink(x):
        out.add(x)

    p = mg.Pipeline("etl")
    s1 = p.producer(numbers, name="gen")
    s2 = p.processor(double, threads=2, name="twice")
    s3 = p.consumer(sink)
    for s in (s1, s2, s3):
        assert isinstance(s, mg.Stage)
    result = p.run()
    assert isinstance(result, mg.RunResult)
    assert result.status == "ok"
    assert out.counter() == collections.Counter([0, 2, 4, 6, 8])
    assert {"gen", "twice", "sink"} <= set(result.stats)


def test_builder_decorators_bare_and_called():
    out = Collector()
    p = mg.Pipeline("deco")

    @p.producer
    def numbers():
        yield from range(4)

    @p.processor(threads=2)
    def inc(x):
        return x + 1

    @p.consumer()
    def sink(x):
        out.add(x)

    assert isinstance(numbers, mg.Stage)
    p.run()
    assert out.counter() == collections.Counter([1, 2, 3, 4])


def test_builder_consumer_accepts_a_builtin(capsys):
    p = mg.Pipeline("printing")
    p.producer(lambda: ["hello", "world"], name="words")
    p.consumer(print)
    p.run()
    assert capsys.readouterr().out.split() == ["hello", "world"]


def test_bound_methods_and_marked_functions_run_in_the_form_of_what_a_call_runs():
    """A stage's form (plain, generator, async) is read off the function a call runs: a
    bound method's function, a coroutine mark's (3.12+), a ``functools.wraps`` chain's end."""

    class Source:
        def numbers(self):
            yield from range(3)

        def both_signs(self, x):
            yield x
            yield -x

        async def doubled(self, x):
            return 2 * x

        def plus_one(self, x):
            return x + 1

    def awaiting(x):  # a plain def whose calls return an awaitable
        return Source().doubled(x)

    if hasattr(inspect, "markcoroutinefunction"):
        awaiting = inspect.markcoroutinefunction(awaiting)
    else:  # before 3.12 only an async def is async
        awaiting = Source().doubled

    source, out = Source(), Collector()

    @functools.wraps(source.both_signs)
    def wrapped_generator(x):
        return source.both_signs(x)

    p = mg.Pipeline("forms")
    p.producer(source.numbers, name="numbers")
    p.processor(source.both_signs, name="both_signs")
    p.processor(wrapped_generator, name="wrapped")
    p.processor(source.doubled, name="doubled")
    p.processor(awaiting, name="awaiting")
    p.processor(source.plus_one, name="plus_one")
    p.consumer(out.add, name="sink")
    result = p.run()
    assert result.status == "ok"
    assert out.counter() == collections.Counter(
        4 * x * sign * sign2 + 1 for x in range(3) for sign in (1, -1) for sign2 in (1, -1)
    )
    assert result.stats["doubled"].strategy == result.stats["awaiting"].strategy == "async"
    assert result.stats["plus_one"].strategy == "threads"


# Builtins of every kind whose parameters come from a text signature: functions, bound and
# unbound methods, slot wrappers, builtin types. Each is made anew per call where it can be
# (a bound method of a new object), so that the second definition of a test meets the same
# signature on another object.
ONE_ITEM_BUILTINS = {
    "function": lambda: len,
    "bound method": lambda: [].append,
    "method descriptor": lambda: bytes.upper,
    "method-wrapper": lambda: bytearray(b"x").__add__,
    "builtin type": lambda: memoryview,
}
OTHER_ARITY_BUILTINS = {
    "function, two": lambda: divmod,
    "bound method, none": lambda: [].clear,
    "method descriptor, three": lambda: bytes.replace,
    "slot wrapper, two": lambda: bytes.__add__,
    "builtin type, none required": lambda: float,
}


@pytest.mark.parametrize("make", ONE_ITEM_BUILTINS.values(), ids=ONE_ITEM_BUILTINS)
def test_a_builtin_taking_one_argument_is_a_consumer(make):
    for _attempt in range(2):
        p = mg.Pipeline("builtin")
        p.producer(lambda: [b"ab"], name="one")
        p.consumer(make(), name="builtin")
        assert p.run().stats["builtin"].items_in == 1


@pytest.mark.parametrize("make", OTHER_ARITY_BUILTINS.values(), ids=OTHER_ARITY_BUILTINS)
def test_a_builtin_taking_other_than_one_argument_is_refused_as_a_consumer(make):
    for _attempt in range(2):
        p = mg.Pipeline("builtin")
        p.producer(lambda: [b"ab"], name="one")
        with pytest.raises(mg.DefinitionError, match="'builtin' must take exactly one"):
            p.consumer(make(), name="builtin")
            p.run()


def test_a_pipeline_built_per_call_with_a_builtin_consumer_leaves_nothing_behind():
    """A service builds its pipeline per call, often with ``results.append`` as the
    consumer: checking that builtin's arity must not leave objects behind (free-threaded
    3.13 kept 16 a call when ``inspect`` parsed its signature each time)."""

    def call(x):
        results = []
        p = mg.Pipeline("per call")
        p.producer(lambda: [x], name="one")
        p.processor(str.upper)
        p.consumer(results.append)
        p.run()
        return results

    calls = 40
    for x in range(5):
        assert call(str(x)) == [str(x)]
    gc.collect()
    before = len(gc.get_objects())
    for x in range(calls):
        assert call(f"item {x}") == [f"ITEM {x}"]
    gc.collect()
    assert len(gc.get_objects()) - before < calls


def test_builder_stage_names_must_be_unique():
    p = mg.Pipeline("dups")
    with pytest.raises(mg.DefinitionError):
        p.producer(lambda: [1], name="gen")
        p.processor(lambda x: x)
        p.processor(lambda x: x)  # two unnamed lambdas collide
        p.run()


def test_named_lambdas_do_not_collide():
    out = Collector()
    p = mg.Pipeline("lambdas")
    p.producer(lambda: range(3), name="gen")
    p.processor(lambda x: x + 1, name="one")
    p.processor(lambda x: x * 10, name="two")
    p.consumer(lambda x: out.add(x), name="sink")
    p.run()
    assert out.counter() == collections.Counter([10, 20, 30])


@pytest.mark.parametrize(
    "bad",
    [lambda: 1, lambda a, b: 1, lambda a, *, k: 1],
    ids=["zero", "two", "kwonly"],
)
def test_builder_processor_arity_is_checked(bad):
    p = mg.Pipeline("arity")
    p.producer(lambda: [1], name="gen")
    with pytest.raises(mg.DefinitionError):
        p.processor(bad, name="bad")
        p.run()


def test_builder_producer_arity_is_checked():
    p = mg.Pipeline("arity")
    with pytest.raises(mg.DefinitionError):
        p.producer(lambda x: [x], name="gen")
        p.consumer(lambda x: None, name="sink")
        p.run()


def test_builder_emission_rules_and_mg_emit():
    out = Collector()
    p = mg.Pipeline("emit")

    @p.producer
    def gen():
        mg.emit(1)
        mg.emit(2)
        return None

    @p.processor
    def both(x):
        mg.emit(("emitted", x))
        return ("returned", x)

    @p.processor
    def gen_proc(item):
        yield item
        yield ("again", item)

    @p.consumer
    def sink(x):
        out.add(x)

    p.run()
    expected = []
    for x in (1, 2):
        for v in (("emitted", x), ("returned", x)):
            expected += [v, ("again", v)]
    assert out.counter() == collections.Counter(expected)


def test_builder_dynamic_routing_with_mg_emit_to():
    small, big = Collector(), Collector()
    p = mg.Pipeline("route")
    p.producer(lambda: range(10), name="gen")

    @p.processor(to=["small", "big"])
    def splitter(x):
        mg.emit(x, to="small" if x < 5 else "big")

    p.consumer(lambda x: small.add(x), name="small")
    p.consumer(lambda x: big.add(x), name="big")
    p.run()
    assert small.counter() == collections.Counter(range(5))
    assert big.counter() == collections.Counter(range(5, 10))


def test_builder_mg_emit_to_undeclared_stage_raises_routing_error():
    errors = Collector()
    p = mg.Pipeline("route")
    p.producer(lambda: [1], name="gen")

    @p.processor(to="left")
    def splitter(x):
        try:
            mg.emit(x, to="right")
        except mg.RoutingError as exc:
            errors.add(exc)

    p.consumer(lambda x: None, name="left")
    p.consumer(lambda x: None, name="right", from_="gen")
    p.run()
    assert len(errors) == 1
    assert "splitter" in str(errors.items[0]) and "right" in str(errors.items[0])


def test_builder_edges_and_round_robin():
    a, b = Collector(), Collector()
    p = mg.Pipeline("rr")
    p.producer(lambda: range(50), name="gen", to=["a", "b"], routing="round_robin")
    p.consumer(lambda x: a.add(x), name="a")
    p.consumer(lambda x: b.add(x), name="b")
    p.run()
    assert a.counter() + b.counter() == collections.Counter(range(50))
    assert len(a) and len(b)


def test_builder_fan_out_broadcast_and_fan_in():
    out = Collector()
    p = mg.Pipeline("diamond")
    p.producer(lambda: range(4), name="gen", to=["x", "y"])
    p.processor(lambda v: ("x", v), name="x")
    p.processor(lambda v: ("y", v), name="y")
    p.consumer(lambda v: out.add(v), name="join", from_=["x", "y"])
    p.run()
    expected = [("x", v) for v in range(4)] + [("y", v) for v in range(4)]
    assert out.counter() == collections.Counter(expected)


# ---------------------------------------------------------------------------
# Accumulators in the builder
# ---------------------------------------------------------------------------


def test_builder_bodyless_accumulator_returns_a_stage_and_is_named_accumulator():
    batches = Collector()
    p = mg.Pipeline("acc")
    p.producer(lambda: range(5), name="gen")
    acc = p.accumulator(max_size=2)
    assert isinstance(acc, mg.Stage)
    p.consumer(lambda b: batches.add(list(b)), name="sink")
    result = p.run()
    assert batches.items == [[0, 1], [2, 3], [4]]
    assert "accumulator" in result.stats


def test_builder_named_bodyless_accumulator():
    batches = Collector()
    p = mg.Pipeline("acc")
    p.producer(lambda: range(5), name="gen")
    p.accumulator(name="batch", max_size=3)
    p.consumer(lambda b: batches.add(list(b)), name="sink")
    result = p.run()
    assert batches.items == [[0, 1, 2], [3, 4]]
    assert result.stats["batch"].items_in == 5


def test_builder_accumulator_used_as_decorator_gets_body_and_function_name():
    out = Collector()
    p = mg.Pipeline("acc")
    p.producer(lambda: range(6), name="gen")

    @p.accumulator(max_size=3)
    def summed(batch):
        assert isinstance(batch, list)
        return sum(batch)

    p.consumer(lambda x: out.add(x), name="sink")
    result = p.run()
    assert out.counter() == collections.Counter([0 + 1 + 2, 3 + 4 + 5])
    assert "summed" in result.stats


def test_builder_accumulator_named_then_decorated_keeps_its_name():
    out = Collector()
    p = mg.Pipeline("acc")
    p.producer(lambda: range(4), name="gen")

    @p.accumulator(name="pairs", max_size=2)
    def body(batch):
        return tuple(batch)

    p.consumer(lambda x: out.add(x), name="sink")
    result = p.run()
    assert out.counter() == collections.Counter([(0, 1), (2, 3)])
    assert "pairs" in result.stats


def test_builder_accumulator_key_and_config_defaults():
    batches = Collector()
    p = mg.Pipeline("acc", config={"accumulator_max_single": 2})
    p.producer(lambda: range(8), name="gen")
    p.accumulator(name="batch", key=lambda x: x % 2)
    p.consumer(lambda b: batches.add(tuple(b)), name="sink")
    p.run()
    assert sorted(batches.items) == [(0, 2), (1, 3), (4, 6), (5, 7)]


def test_builder_accumulator_with_threads_is_a_definition_error():
    p = mg.Pipeline("acc")
    p.producer(lambda: range(3), name="gen")
    with pytest.raises(mg.DefinitionError):
        p.accumulator(name="batch", max_size=2, threads=2)
        p.run()


# ---------------------------------------------------------------------------
# Builder hooks
# ---------------------------------------------------------------------------


def test_builder_hooks_are_plain_functions():
    events = Collector()
    p = mg.Pipeline("hooks")
    p.producer(lambda: range(3), name="gen")

    @p.processor(threads=2)
    def work(x):
        events.add(("work", x))
        if x == 1:
            raise ValueError("one")
        return x

    p.consumer(lambda x: events.add(("sink", x)), name="sink")

    p.before_run(lambda: events.add("before_run"))
    p.after_run(lambda: events.add("after_run"))
    p.before("work")(lambda: events.add("before:work"))
    p.after("work")(lambda: events.add("after:work"))

    @p.on_error(ValueError)
    def handle(error, item, stage):
        events.add(("error", str(error), item, stage))

    p.run()
    ev = events.items
    assert ev[0] == "before_run"
    assert ev[-1] == "after_run"
    assert ev.count("before:work") == 1 and ev.count("after:work") == 1
    work_idx = [i for i, e in enumerate(ev) if isinstance(e, tuple) and e[0] == "work"]
    assert ev.index("before:work") < min(work_idx)
    assert ev.index("after:work") > max(work_idx)
    assert ("error", "one", 1, "work") in ev
    assert collections.Counter(e for e in ev if isinstance(e, tuple) and e[0] == "sink") == (
        collections.Counter([("sink", 0), ("sink", 2)])
    )


def test_builder_hook_order_and_prepend():
    events = Collector()
    p = mg.Pipeline("order")
    p.producer(lambda: [1], name="gen")
    p.consumer(lambda x: None, name="sink")
    p.before_run(lambda: events.add("first"))
    p.before_run(lambda: events.add("second"))
    p.before_run(lambda: events.add("zeroth"), prepend=True)
    p.run()
    assert events.items == ["zeroth", "first", "second"]


def test_builder_unhandled_error_raises_pipeline_error():
    after = Collector()
    p = mg.Pipeline("fail")
    p.producer(lambda: range(3), name="gen")

    def boom(x):
        raise ZeroDivisionError("nope")

    p.consumer(boom, name="boom")
    p.after_run(lambda: after.add(1))
    with pytest.raises(mg.PipelineError) as info:
        p.run()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "boom" in str(info.value)
    assert info.value.result.status == "failed"
    assert after.items == [1]


def test_builder_retries():
    attempts = collections.Counter()
    lock = threading.Lock()
    out = Collector()
    p = mg.Pipeline("retry")
    p.producer(lambda: range(3), name="gen")

    def flaky(x):
        with lock:
            attempts[x] += 1
            n = attempts[x]
        if n == 1:
            raise OSError("first try")
        return x

    p.processor(flaky, retries=1, retry_on=(OSError,), name="flaky")
    p.consumer(lambda x: out.add(x), name="sink")
    result = p.run()
    assert attempts == collections.Counter({0: 2, 1: 2, 2: 2})
    assert out.counter() == collections.Counter(range(3))
    assert result.stats["flaky"].retries == 3


# ---------------------------------------------------------------------------
# Triggers, start(), config=, mermaid
# ---------------------------------------------------------------------------


def test_builder_before_run_may_trigger_with_mg_trigger():
    out = Collector()
    p = mg.Pipeline("trigger")
    p.producer(lambda: range(3), name="late", auto_start=False)
    p.consumer(lambda x: out.add(x), name="sink")
    p.before_run(lambda: mg.trigger("late"))
    assert p.run().status == "ok"
    assert out.counter() == collections.Counter(range(3))


def test_builder_stage_may_trigger_with_mg_trigger():
    out = Collector()
    p = mg.Pipeline("trigger")
    p.producer(lambda: ["go"], name="first")
    p.producer(lambda: [1, 2], name="late", auto_start=False)

    def sink(x):
        out.add(x)
        if x == "go":
            mg.trigger("late")

    p.consumer(sink, name="sink")
    p.run()
    assert out.counter() == collections.Counter(["go", 1, 2])


def test_builder_run_with_only_manual_producers_is_a_definition_error():
    p = mg.Pipeline("manual")
    p.producer(lambda: [1], name="late", auto_start=False)
    p.consumer(lambda x: None, name="sink")
    with pytest.raises(mg.DefinitionError):
        p.run()


@pytest.mark.timeout(30)
def test_builder_start_and_trigger():
    out = Collector()
    p = mg.Pipeline("manual")
    p.producer(lambda: [1, 2], name="late", auto_start=False)
    p.consumer(lambda x: out.add(x), name="sink")
    run = p.start()
    assert isinstance(run, mg.Run)
    try:
        run.trigger("late")
        result = run.wait(timeout=10)
    finally:
        if run.running:
            run.cancel()
    assert result.status == "ok"
    assert out.counter() == collections.Counter([1, 2])


@pytest.mark.timeout(30)
def test_builder_config_limits_cap_threads(mg_caplog):
    conc = Concurrency()
    p = mg.Pipeline("limits", config={"max_threads": 2})
    p.producer(lambda: range(20), name="gen")

    def greedy(x):
        with conc:
            time.sleep(0.01)

    p.consumer(greedy, threads=8, name="greedy")
    assert p.run().status == "ok"
    assert conc.peak <= 2
    assert len(minigun_warnings(mg_caplog.records, "greedy")) == 1


def test_builder_to_mermaid():
    p = mg.Pipeline("graph")
    p.producer(lambda: [1], name="source_stage")
    p.processor(lambda x: x, name="middle_stage")
    p.consumer(lambda x: None, name="sink_stage")
    text = p.to_mermaid()
    assert isinstance(text, str)
    assert text.lstrip().startswith("flowchart")
    for name in ("source_stage", "middle_stage", "sink_stage"):
        assert name in text
