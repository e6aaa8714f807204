"""Class DSL (API.md section 1): stage kinds, arity checks, emission rules, decorator
forms, inheritance and overriding, Task ``__init__``."""

import collections
import functools
import threading
import time
from collections.abc import Callable

import pytest
from _mg_helpers import Collector
from hypothesis import given, settings
from hypothesis import strategies as st

import minigun as mg

# ---------------------------------------------------------------------------
# Public names
# ---------------------------------------------------------------------------

PUBLIC_NAMES = [
    "Task",
    "Pipeline",
    "Stage",
    "Run",
    "RunResult",
    "producer",
    "processor",
    "consumer",
    "accumulator",
    "before_run",
    "after_run",
    "before_fork",
    "after_fork",
    "before",
    "after",
    "on_error",
    "emit",
    "trigger",
    "nested",
    "MinigunError",
    "DefinitionError",
    "RoutingError",
    "UnsupportedStrategy",
    "PipelineError",
    "WorkerError",
]


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_exists(name):
    assert hasattr(mg, name), f"minigun.{name} is part of the public API"


@pytest.mark.parametrize(
    "name",
    ["DefinitionError", "RoutingError", "UnsupportedStrategy", "PipelineError", "WorkerError"],
)
def test_errors_derive_from_minigun_error(name):
    exc = getattr(mg, name)
    assert issubclass(exc, mg.MinigunError)
    assert issubclass(mg.MinigunError, Exception)


def test_definition_error_is_catchable_as_minigun_error():
    with pytest.raises(mg.MinigunError):

        class Bad(mg.Task):
            @mg.producer
            def gen(self, required):
                yield required


# ---------------------------------------------------------------------------
# Basic runs and default sequential routing
# ---------------------------------------------------------------------------


def test_linear_chain_runs_in_definition_order():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(6)

        @mg.processor
        def double(self, x):
            return x * 2

        @mg.processor
        def plus_one(self, x):
            return x + 1

        @mg.consumer
        def sink(self, x):
            out.add(x)

    result = Job().run()
    assert isinstance(result, mg.RunResult)
    assert result.status == "ok"
    # Single-threaded chain: order is preserved, and double runs before plus_one.
    assert out.items == [1, 3, 5, 7, 9, 11]


def test_stage_name_defaults_to_function_name_and_name_option_overrides():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor(name="twice")
        def double(self, x):
            return x * 2

        @mg.consumer
        def sink(self, x):
            out.add(x)

    result = Job().run()
    assert sorted(out.items) == [0, 2, 4]
    assert "twice" in result.stats
    assert "double" not in result.stats
    assert "gen" in result.stats and "sink" in result.stats
    assert result.stats["twice"].items_in == 3


def test_decorators_work_bare_and_called():
    out = Collector()

    class Called(mg.Task):
        @mg.producer()
        def gen(self):
            yield from range(5)

        @mg.processor()
        def inc(self, x):
            return x + 1

        @mg.accumulator()
        def batch(self, items):
            return items

        @mg.consumer()
        def sink(self, batch):
            out.add(list(batch))

    assert Called().run().status == "ok"
    # Default max_size (2000) holds everything: one batch at the end of the stream.
    assert out.items == [[1, 2, 3, 4, 5]]


def test_producer_option_threads_accepted_on_called_decorator():
    out = Collector()

    class Job(mg.Task):
        @mg.producer(threads=1)
        def gen(self):
            yield from range(4)

        @mg.processor(threads=2)
        def inc(self, x):
            return x + 1

        @mg.consumer(threads=2)
        def sink(self, x):
            out.add(x)

    Job().run()
    assert out.counter() == collections.Counter([1, 2, 3, 4])


@pytest.mark.parametrize("strategy", ["threads", "threaded", "inline"])
def test_thread_and_inline_strategies_deliver_every_item(strategy):
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(20)

        @mg.processor(strategy=strategy)
        def square(self, x):
            return x * x

        @mg.consumer(strategy=strategy)
        def sink(self, x):
            out.add(x)

    assert Job().run().status == "ok"
    assert out.counter() == collections.Counter(x * x for x in range(20))


def test_default_strategy_inline_is_accepted():
    out = Collector()

    class Job(mg.Task):
        default_strategy = "inline"

        @mg.producer
        def gen(self):
            yield from range(5)

        @mg.processor
        def neg(self, x):
            return -x

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert sorted(out.items) == [-4, -3, -2, -1, 0]


def test_single_worker_by_default():
    lock = threading.Lock()
    state = {"cur": 0, "peak": 0}

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(15)

        @mg.consumer
        def sink(self, x):
            with lock:
                state["cur"] += 1
                state["peak"] = max(state["peak"], state["cur"])
            time.sleep(0.005)
            with lock:
                state["cur"] -= 1

    Job().run()
    assert state["peak"] == 1


def test_function_stage_workers_share_the_task_instance():
    seen = Collector()
    barrier = threading.Barrier(3, timeout=5)

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in range(6):
                yield i
                time.sleep(0.05)

        @mg.processor(threads=3)
        def work(self, x):
            if x < 3:
                barrier.wait()  # forces three workers to be busy at once
            seen.add((id(self), threading.get_ident()))
            return x

    job = Job()
    job.run()
    assert {s for s, _ in seen.items} == {id(job)}
    assert len({t for _, t in seen.items}) >= 3


# ---------------------------------------------------------------------------
# Arity checks (at class creation)
# ---------------------------------------------------------------------------


def _zero(self):
    return 1


def _two(self, a, b):
    return 1


def _kwonly_required(self, a, *, k):
    return 1


def _only_kwonly_required(self, *, k):
    return 1


@pytest.mark.parametrize("fn", [_zero, _two, _kwonly_required, _only_kwonly_required])
@pytest.mark.parametrize("decorator", ["processor", "consumer", "accumulator"])
def test_item_stage_arity_violation_raises_at_class_creation(decorator, fn):
    deco = getattr(mg, decorator)
    with pytest.raises(mg.DefinitionError) as info:

        class Bad(mg.Task):
            @mg.producer
            def gen(self):
                yield 1

            bad = deco(fn)

    assert fn.__name__ in str(info.value), "the message names the stage"


def _producer_with_item(self, x):
    yield x


def _producer_with_kwonly(self, *, k):
    yield k


@pytest.mark.parametrize("fn", [_producer_with_item, _producer_with_kwonly])
def test_producer_with_required_parameter_raises(fn):
    with pytest.raises(mg.DefinitionError):

        class Bad(mg.Task):
            gen = mg.producer(fn)

            @mg.consumer
            def sink(self, x):
                pass


def test_called_decorator_arity_checked_too():
    with pytest.raises(mg.DefinitionError):

        class Bad(mg.Task):
            @mg.producer
            def gen(self):
                yield 1

            @mg.processor(threads=2)
            def two(self, a, b):
                return a


@st.composite
def _parameter_lists(draw: st.DrawFn) -> str:
    """A Python parameter list: positional-only, positional with and without defaults,
    *args, keyword-only with and without defaults."""
    names = iter("abcdefghij")
    positional = draw(st.integers(0, 3))
    defaults = draw(st.integers(0, positional))
    parts = [
        next(names) if i < positional - defaults else f"{next(names)}=1" for i in range(positional)
    ]
    if positional and draw(st.booleans()):
        parts.insert(draw(st.integers(1, positional)), "/")
    keyword_only = [
        f"{next(names)}=1" if draw(st.booleans()) else next(names)
        for _ in range(draw(st.integers(0, 2)))
    ]
    if draw(st.booleans()):
        parts.append("*args")
    elif keyword_only:
        parts.append("*")
    return ", ".join(parts + keyword_only)


def _outcome(define: Callable[[], object]) -> str:
    try:
        define()
    except mg.DefinitionError as error:
        return str(error)
    return "accepted"


@settings(max_examples=60, deadline=None)
@given(params=_parameter_lists(), kind=st.sampled_from(["producer", "processor", "consumer"]))
def test_a_plain_function_is_checked_as_its_signature_says(params, kind):
    """A plain function's parameters are read off its code object; a wrapped one's come from
    inspect.signature: both must accept and refuse the same stages, with the same words."""
    scope: dict[str, object] = {}
    exec(f"def work({params}):\n    return 1\n", scope)
    plain = scope["work"]

    @functools.wraps(plain)
    def wrapped(*args, **kwargs):
        return plain(*args, **kwargs)

    def in_a_pipeline(fn: object) -> Callable[[], object]:
        return lambda: getattr(mg.Pipeline("arity"), kind)(fn, name="work")

    assert _outcome(in_a_pipeline(plain)) == _outcome(in_a_pipeline(wrapped))
    exec(
        f"def method({', '.join(['self', params] if params else ['self'])}):\n    return 1\n", scope
    )
    method = scope["method"]

    @functools.wraps(method)
    def wrapped_method(*args, **kwargs):
        return method(*args, **kwargs)

    def in_a_task(fn: object) -> Callable[[], object]:
        return lambda: type("Job", (mg.Task,), {"work": getattr(mg, kind)(fn)})

    assert _outcome(in_a_task(method)) == _outcome(in_a_task(wrapped_method))


def test_optional_parameters_do_not_count_toward_arity():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self, start=10):
            yield from range(start, start + 3)

        @mg.processor
        def with_default(self, x, y=100):
            return x + y

        @mg.processor
        def with_varargs(self, *args):
            assert len(args) == 1
            return args[0] + 1000

        @mg.processor
        def with_optional_kwonly(self, x, *, k=5):
            return x + k

        @mg.consumer
        def sink(self, x, extra=None):
            out.add(x)

    Job().run()
    assert sorted(out.items) == [1115, 1116, 1117]


def test_duplicate_stage_name_raises():
    with pytest.raises(mg.DefinitionError):

        class Bad(mg.Task):
            @mg.producer
            def gen(self):
                yield 1

            @mg.processor(name="same")
            def a(self, x):
                return x

            @mg.processor(name="same")
            def b(self, x):
                return x

        Bad().run()


def test_unknown_strategy_raises_definition_error():
    with pytest.raises(mg.DefinitionError):

        class Bad(mg.Task):
            @mg.producer
            def gen(self):
                yield 1

            @mg.processor(strategy="no-such-strategy")
            def a(self, x):
                return x

        Bad().run()


# ---------------------------------------------------------------------------
# Emission rules
# ---------------------------------------------------------------------------


def test_generator_producer_emits_each_yielded_value():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield "a"
            yield "b"
            yield "c"

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert out.items == ["a", "b", "c"]


def test_non_generator_producer_returns_iterable_whose_elements_are_emitted():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            return [1, 2, 3]

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert out.items == [1, 2, 3]


def test_non_generator_producer_may_return_none_and_use_self_emit():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            for i in range(4):
                self.emit(i)
            return None

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert out.items == [0, 1, 2, 3]


def test_generator_producer_may_mix_yield_and_self_emit():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1
            self.emit(2)
            yield 3

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert out.counter() == collections.Counter([1, 2, 3])


def test_processor_return_none_emits_nothing_but_falsy_values_are_emitted():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(6)

        @mg.processor
        def mapper(self, x):
            return {0: 0, 1: None, 2: "", 3: False, 4: [], 5: None}[x]

        @mg.consumer
        def sink(self, x):
            out.add(repr(x))

    Job().run()
    assert out.counter() == collections.Counter(["0", "''", "False", "[]"])


def test_processor_returning_a_list_emits_the_list_as_one_item():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 2
            yield 3

        @mg.processor
        def listify(self, x):
            return [x] * x

        @mg.consumer
        def sink(self, x):
            out.add(tuple(x))

    Job().run()
    assert out.counter() == collections.Counter([(2, 2), (3, 3, 3)])


def test_generator_processor_emits_every_yielded_value():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        @mg.processor
        def explode(self, x):
            for i in range(x):
                yield (x, i)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    expected = [(x, i) for x in range(4) for i in range(x)]
    assert out.counter() == collections.Counter(expected)


def test_processor_self_emit_adds_to_its_return_value():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor
        def both(self, x):
            self.emit(("emitted", x))
            return ("returned", x)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    expected = [("emitted", x) for x in range(3)] + [("returned", x) for x in range(3)]
    assert out.counter() == collections.Counter(expected)


def test_self_emit_from_a_generator_processor():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.processor
        def both(self, x):
            self.emit("e")
            yield "y"

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert out.counter() == collections.Counter(["e", "y"])


def test_consumer_is_an_alias_of_processor_and_emits_its_return_value():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.consumer
        def first(self, x):
            return x + 10

        @mg.consumer
        def second(self, x):
            out.add(x)

    Job().run()
    assert sorted(out.items) == [10, 11, 12]


def test_bodyless_accumulator_as_class_attribute_emits_batches():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(7)

        batch = mg.accumulator("batch", max_size=3)

        @mg.consumer
        def sink(self, b):
            out.add(list(b))

    result = Job().run()
    assert out.items == [[0, 1, 2], [3, 4, 5], [6]]
    assert "batch" in result.stats


def test_accumulator_body_receives_lists_and_follows_processor_rules():
    sizes = Collector()
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(8)

        @mg.accumulator(max_size=4)
        def total(self, items):
            sizes.add((type(items), len(items)))
            if items[0] == 0:
                return None  # emits nothing for the first batch
            return sum(items)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert sizes.items == [(list, 4), (list, 4)]
    assert out.items == [4 + 5 + 6 + 7]


def test_generator_accumulator_yields_each_value():
    out = Collector()

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(6)

        @mg.accumulator(max_size=3)
        def pairs(self, items):
            for item in items:
                yield (len(items), item)

        @mg.consumer
        def sink(self, x):
            out.add(x)

    Job().run()
    assert out.counter() == collections.Counter((3, i) for i in range(6))


# ---------------------------------------------------------------------------
# Inheritance and overriding
# ---------------------------------------------------------------------------


def _make_base(out, batches):
    class Base(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(6)

        @mg.processor
        def transform(self, x):
            return x * 2

        @mg.accumulator(max_size=2)
        def batch(self, items):
            batches.add(list(items))
            return items

        @mg.consumer
        def sink(self, b):
            for x in b:
                out.add(x)

    return Base


def test_subclass_inherits_stages():
    out, batches = Collector(), Collector()
    Base = _make_base(out, batches)

    class Sub(Base):
        pass

    Sub().run()
    assert out.items == [0, 2, 4, 6, 8, 10]
    assert batches.items == [[0, 2], [4, 6], [8, 10]]


def test_plain_override_replaces_body_and_keeps_kind_and_options():
    out, batches = Collector(), Collector()
    Base = _make_base(out, batches)

    class Sub(Base):
        def transform(self, x):  # plain: still a processor in the same place
            return x * 3

        def batch(self, items):  # plain: still an accumulator with max_size=2
            batches.add(("sub", list(items)))
            return items

    Sub().run()
    assert out.items == [0, 3, 6, 9, 12, 15]
    assert batches.items == [("sub", [0, 3]), ("sub", [6, 9]), ("sub", [12, 15])]


def test_decorated_override_changes_options():
    out, batches = Collector(), Collector()
    Base = _make_base(out, batches)

    class Sub(Base):
        @mg.accumulator(max_size=3)
        def batch(self, items):
            batches.add(("sub", list(items)))
            return items

    Sub().run()
    assert out.items == [0, 2, 4, 6, 8, 10]
    assert batches.items == [("sub", [0, 2, 4]), ("sub", [6, 8, 10])]


def test_override_does_not_change_the_base_class():
    out, batches = Collector(), Collector()
    Base = _make_base(out, batches)

    class Sub(Base):
        def transform(self, x):
            return -x

    Sub().run()
    Base().run()  # Base keeps its own body
    assert out.items[:6] == [0, -1, -2, -3, -4, -5]
    assert out.items[6:] == [0, 2, 4, 6, 8, 10]


def test_subclass_may_add_a_stage():
    out, batches = Collector(), Collector()
    Base = _make_base(out, batches)
    extra = Collector()

    class Sub(Base):
        @mg.consumer(from_="transform")
        def audit(self, x):
            extra.add(x)

    Sub().run()
    assert sorted(extra.items) == [0, 2, 4, 6, 8, 10]
    assert sorted(out.items) == [0, 2, 4, 6, 8, 10]


def test_subclass_inherits_hooks():
    events = Collector()

    class Base(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer
        def sink(self, x):
            events.add(("item", x))

        @mg.before_run
        def start_hook(self):
            events.add("before_run")

        @mg.after_run
        def end_hook(self):
            events.add("after_run")

    class Sub(Base):
        pass

    Sub().run()
    assert events.items == ["before_run", ("item", 1), "after_run"]


# ---------------------------------------------------------------------------
# Task __init__
# ---------------------------------------------------------------------------


def test_task_init_with_parameters_without_super_call():
    out = Collector()

    class Job(mg.Task):
        def __init__(self, factor, count=3):
            self.factor = factor
            self.count = count

        @mg.producer
        def gen(self):
            yield from range(self.count)

        @mg.processor
        def scale(self, x):
            return x * self.factor

        @mg.consumer
        def sink(self, x):
            out.add(x)

        @mg.before_run
        def hook(self):
            out.add(("hook sees", self.factor))

    Job(7, count=4).run()
    assert out.counter() == collections.Counter([("hook sees", 7), 0, 7, 14, 21])


def test_root_pipeline_is_a_pipeline():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.consumer
        def sink(self, x):
            pass

    assert isinstance(Job.root_pipeline, mg.Pipeline)


_FORMS = {
    "plain": "def work(x):\n    return x * 2\n",
    "generator": "def work(x):\n    yield x * 2\n",
    "async": "async def work(x):\n    return x * 2\n",
    "async generator": "async def work(x):\n    yield x * 2\n",
}


@pytest.mark.parametrize("dressing", ["bare", "with an attribute"])
@pytest.mark.parametrize("form", _FORMS)
def test_a_processor_runs_as_its_functions_form_says(form, dressing):
    """A bare function's form is read off its code flags; one with attributes (which may
    be a ``__wrapped__`` or a coroutine mark) is asked of ``inspect``: both run alike."""
    scope: dict[str, object] = {}
    exec(_FORMS[form], scope)
    work = scope["work"]
    if dressing == "with an attribute":
        work.note = "kept"  # type: ignore[attr-defined]
    out: list[int] = []
    p = mg.Pipeline("forms")
    p.producer(lambda: range(3), name="source")
    p.processor(work, name="work")
    p.consumer(out.append, name="sink")
    result = p.run()
    assert sorted(out) == [0, 2, 4]
    assert result.stats["work"].strategy == ("async" if "async" in form else "threads")
