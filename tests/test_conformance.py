"""The conformance matrix (issue 10, item 7): one item contract for every strategy.

Every strategy of ``conformance.strategies.REGISTRY`` x every stage form of
``conformance.forms.FORMS`` (a function returning a value, a generator, ``emit``, a custom
``mg.Stage`` with per-worker ``open``/``process``/``close``, callable objects, and their
``async def`` versions) x both APIs (builder and class DSL; a callable object only in the
builder) runs under four scenarios, with the same expectations for all:

* handled error: items of a random subset fail every attempt and an ``on_error`` handler
  takes them; the others arrive exactly once; the handler sees each failed item once, as
  the item itself; retries happen as asked;
* retry that succeeds: items of a random subset fail their first attempts, fewer than
  ``retries=``; every item arrives exactly once and nothing reaches ``on_error``;
* unhandled error: the run fails with ``mg.PipelineError`` whose cause is the original
  exception type; nothing arrives twice;
* cancel: ``cancel()`` on an endless run is honoured within 1 s with status "cancelled".

Always: what a failed attempt emitted never arrives; stats equal the true counts; a custom
stage's workers are opened and closed once each; and afterwards no fd, thread or child
process is left behind. A form a strategy cannot run (``async def`` on a thread pool, a
plain function on the async strategy, a method of the matrix's Task classes, made inside a
function and holding locks, for a strategy that pickles the Task into its workers) must be
refused with ``mg.DefinitionError`` before anything runs.

The seams between strategies: two consecutive stages on every ordered pair of strategies
pass every item exactly once, or the pair is refused up front (a fork beside
subinterpreters).

The fork stress test (forks beside spawn_thread stages and beside a second run in another
thread) is tests/test_fork_stress.py, behind the ``stress`` marker.
"""

from __future__ import annotations

import collections
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from _mg_helpers import Collector, LeftBehind, assert_nothing_left_on_ray, wait_until
from conformance import pairs
from conformance.forms import (
    APIS,
    FORMS,
    STAGE,
    Boom,
    Job,
    attempts,
    build,
    make_item,
    worker_events,
)
from conformance.strategies import INTERMITTENT, REGISTRY, REJECT, SCENARIOS
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import minigun as mg

#: Small, deterministic and quick: a failing cell is reduced by hand (see the registry),
#: so hypothesis does not spend the suite's time shrinking.
MATRIX = settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: An item that fails on every attempt.
ALWAYS = 1_000
#: How long a finished run's threads and children may take to disappear.
SETTLE = 1.0
#: How long cancel() may take to end a run (API contract: promptly; issue 10: within 1 s).
CANCEL_WITHIN = 1.0


def _cells(scenario):
    """pytest params (case, form, api) of one scenario, xfail where a defect is known."""
    for case, form, api in itertools.product(REGISTRY, FORMS, APIS):
        if not form.written_in(api):
            continue
        # A Task method is copied with its Task, which the matrix makes unpicklable.
        pickled_task = case.pickles_task and api == "task" and not form.is_custom
        rejected = form.is_async != case.runs_async or pickled_task
        if rejected != (scenario == REJECT):
            continue
        marks = [pytest.mark.ray] if case.needs_ray else []
        unavailable = case.unavailable()
        if unavailable:
            marks.append(pytest.mark.skip(reason=unavailable))
        defect = case.defect(form.name, scenario)
        if defect:
            marks.append(pytest.mark.xfail(strict=defect not in INTERMITTENT, reason=defect))
        yield pytest.param(case, form, api, id=f"{case}-{form}-{api}", marks=marks)


def matrix(scenario):
    return pytest.mark.parametrize(("case", "form", "api"), list(_cells(scenario)))


@pytest.fixture(autouse=True)
def _ray_for_ray_cells(request):
    """The Ray cells run on the session's Ray (one start per test session)."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    cases = [params.get(name) for name in ("case", "first", "second")]
    if any(case is not None and case.needs_ray for case in cases):
        request.getfixturevalue("ray_session")


# -- one run of a cell ----------------------------------------------------------------------------


@dataclass
class Cell:
    """One pipeline of the matrix and everything it recorded."""

    case: object
    form: object
    api: str
    retries: int
    handler: bool

    def __post_init__(self):
        self.folder = tempfile.mkdtemp(prefix="mg-conformance-")
        self.sink = Collector()
        self.errors = Collector() if self.handler else None
        self.before = LeftBehind()

    def job(self, items):
        options = {**self.case.options, "retries": self.retries, "retry_backoff": 0.001}
        return Job(self.form, options, items, self.sink, self.errors, self.folder)

    def pipeline(self, items):
        return build(self.api, self.job(items))

    def item(self, x, fail_first=0, delay=0.0):
        return make_item(x, fail_first, self.folder, delay)

    def received(self, kind):
        return collections.Counter(v[1] for v in self.sink.items if v[0] == kind)

    def attempts(self, x):
        return attempts(self.folder, x)

    def attempted(self):
        """How many items were attempted at least once."""
        return sum(name.endswith(".attempts") for name in os.listdir(self.folder))

    def finish(self):
        """Everything the run started must be gone (then the files are removed)."""
        try:
            if self.case.needs_ray:
                assert_nothing_left_on_ray(self.before, settle=SETTLE)
            else:
                self.before.assert_nothing_new(settle=SETTLE)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def check_workers(self, ran_ok):
        """A custom stage: each worker opened once and closed once, within the bound."""
        if not self.form.is_custom:
            return
        opens = worker_events(self.folder, "opens")
        closes = worker_events(self.folder, "closes")
        assert len(set(opens)) == len(opens), "a worker token was opened twice"
        assert collections.Counter(closes) == collections.Counter(opens), (
            f"every opened worker must be closed exactly once: opens {opens}, closes {closes}"
        )
        if self.case.max_workers is not None:
            assert len(opens) <= self.case.max_workers, f"{len(opens)} workers opened"
        if self.received("out"):
            assert opens, "items were processed without any worker being opened"
        if ran_ok:
            assert sorted(self.received("close")) == sorted(closes), (
                "what close() emitted must arrive once per worker"
            )

    def check_no_poison(self):
        assert not self.received("poison"), (
            f"outputs of failed attempts arrived: {dict(self.received('poison'))}"
        )

    def workers_emitted(self):
        return len(worker_events(self.folder, "closes")) if self.form.is_custom else 0


@st.composite
def faults(draw, retried, at_least_one=False):
    """(n items, {failing item: attempts that fail}, retries)."""
    n = draw(st.integers(1 if at_least_one else 0, 8))
    failing = (
        draw(st.sets(st.integers(0, max(n - 1, 0)), min_size=int(at_least_one), max_size=n))
        if n
        else set()
    )
    retries = draw(st.integers(1, 3) if retried else st.integers(0, 2))
    fail_first = {x: draw(st.integers(1, retries)) if retried else ALWAYS for x in failing}
    return n, fail_first, retries


# -- the scenarios --------------------------------------------------------------------------------


@matrix("handled")
@MATRIX
@given(faults(retried=False))
def test_handled_error(case, form, api, draw):
    n, fail_first, retries = draw
    cell = Cell(case, form, api, retries, handler=True)
    try:
        items = [cell.item(x, fail_first.get(x, 0)) for x in range(n)]
        result = cell.pipeline(lambda: iter(items)).run()
        failing = set(fail_first)

        assert result.status == "ok"
        assert cell.received("out") == collections.Counter(set(range(n)) - failing)
        cell.check_no_poison()
        handled = cell.errors.items
        assert collections.Counter(item for _, item, _ in handled) == collections.Counter(
            items[x] for x in failing
        ), "on_error must get each failed item once, itself"
        assert all(kind is Boom for kind, _, _ in handled)
        assert all(stage == STAGE for _, _, stage in handled)
        for x in range(n):
            assert cell.attempts(x) == (1 + retries if x in failing else 1), x
        stats = result.stats[STAGE]
        assert (stats.items_in, stats.errors, stats.retries) == (
            n,
            len(failing),
            len(failing) * retries,
        )
        # Everything the sink received came from the stage, and only from items that
        # succeeded.
        assert stats.items_out == result.stats["sink"].items_in == len(cell.sink)
        cell.check_workers(ran_ok=True)
    finally:
        cell.finish()


@matrix("retry")
@MATRIX
@given(faults(retried=True))
def test_retry_that_succeeds(case, form, api, draw):
    n, fail_first, retries = draw
    cell = Cell(case, form, api, retries, handler=True)
    try:
        items = [cell.item(x, fail_first.get(x, 0)) for x in range(n)]
        result = cell.pipeline(lambda: iter(items)).run()

        assert result.status == "ok"
        assert cell.received("out") == collections.Counter(range(n))
        cell.check_no_poison()
        assert cell.errors.items == [], "a retry that succeeds is not an error"
        for x in range(n):
            assert cell.attempts(x) == 1 + fail_first.get(x, 0), x
        stats = result.stats[STAGE]
        assert (stats.items_in, stats.errors, stats.retries) == (n, 0, sum(fail_first.values()))
        assert stats.items_out == result.stats["sink"].items_in == len(cell.sink)
        assert len(cell.sink) == n + cell.workers_emitted()
        cell.check_workers(ran_ok=True)
    finally:
        cell.finish()


@matrix("no_retry")
def test_a_failed_single_attempt_emits_nothing(case, form, api):
    """Without retries= too, what an attempt emitted before it failed never arrives."""
    cell = Cell(case, form, api, retries=0, handler=True)
    try:
        items = [cell.item(x, ALWAYS if x % 2 else 0) for x in range(6)]
        result = cell.pipeline(lambda: iter(items)).run()
        assert result.status == "ok"
        assert cell.received("out") == collections.Counter([0, 2, 4])
        cell.check_no_poison()
        assert len(cell.errors) == 3
    finally:
        cell.finish()


@matrix("unhandled")
@MATRIX
@given(faults(retried=False, at_least_one=True))
def test_unhandled_error(case, form, api, draw):
    n, fail_first, retries = draw
    cell = Cell(case, form, api, retries, handler=False)
    try:
        items = [cell.item(x, fail_first.get(x, 0)) for x in range(n)]
        with pytest.raises(mg.PipelineError) as info:
            cell.pipeline(lambda: iter(items)).run()
        error = info.value

        assert isinstance(error.__cause__, Boom), repr(error.__cause__)
        assert STAGE in str(error)
        assert error.result.status == "failed"
        received = cell.received("out")
        assert set(received) <= set(range(n)) - set(fail_first)
        assert all(count == 1 for count in received.values()), dict(received)
        cell.check_no_poison()
        for x in range(n):
            assert cell.attempts(x) <= (1 + retries if x in fail_first else 1), x
        cell.check_workers(ran_ok=False)
    finally:
        cell.finish()


@matrix("cancel")
@settings(MATRIX, max_examples=2)
@given(attempts_before_cancel=st.integers(0, 4))
def test_cancel(case, form, api, attempts_before_cancel):
    cell = Cell(case, form, api, retries=0, handler=True)
    try:
        endless = lambda: (cell.item(x, delay=0.005) for x in itertools.count())  # noqa: E731
        run = cell.pipeline(endless).start()
        try:
            # Attempts, not outputs: a buffering stage emits only when its workers close.
            assert wait_until(lambda: cell.attempted() >= attempts_before_cancel, timeout=10)
        finally:
            began = time.monotonic()
            run.cancel()
            result = run.wait(timeout=10)
        took = time.monotonic() - began

        assert result.status == "cancelled"
        assert took <= CANCEL_WITHIN, f"cancel() took {took:.2f} s"
        received = cell.received("out")
        assert all(count == 1 for count in received.values()), dict(received)
        assert all(cell.attempts(x) == 1 for x in received)
        cell.check_no_poison()
        assert cell.errors.items == []
        cell.check_workers(ran_ok=False)
    finally:
        cell.finish()


@matrix(REJECT)
def test_a_form_the_strategy_cannot_run_is_refused_up_front(case, form, api):
    cell = Cell(case, form, api, retries=0, handler=True)
    try:
        items = [cell.item(x) for x in range(3)]
        with pytest.raises(mg.DefinitionError) as info:
            cell.pipeline(lambda: iter(items)).run()
        assert STAGE in str(info.value), "the error must name the stage"
        assert cell.sink.items == [] and all(cell.attempts(x) == 0 for x in range(3)), (
            "DefinitionError must come before anything runs"
        )
    finally:
        cell.finish()


def test_every_scenario_has_cells_for_every_registered_strategy():
    """The registry drives the matrix: each strategy appears in every scenario."""
    for scenario in SCENARIOS:
        names = {p.values[0].name for p in _cells(scenario)}
        assert names == {case.name for case in REGISTRY}, scenario


# -- the seams: two stages on any two strategies ------------------------------------------------

FORKING = {"spawn_fork", "fork_ipc"}
SUBINTERPRETERS = {"interpreters", "spawn_interpreter"}
PAIR_ITEMS = 12


def _pairs() -> Iterator[Any]:
    """Every ordered pair of strategies; a pair with a Ray strategy runs on the session's
    Ray (marker ``ray``)."""
    for first, second in itertools.product(REGISTRY, REGISTRY):
        marks = [pytest.mark.ray] if first.needs_ray or second.needs_ray else []
        yield pytest.param(first, second, id=f"{first}-{second}", marks=marks)


@pytest.mark.parametrize(("first", "second"), list(_pairs()))
def test_two_stages_of_any_two_strategies_pass_every_item_once(first, second):
    """Items cross from a stage on one strategy to a stage on another exactly once, for
    every ordered pair; a pair that cannot run in one process (a fork beside
    subinterpreters: CPython issue 101437) is refused before anything runs."""
    for case in (first, second):
        if why := case.unavailable():
            pytest.skip(why)
    got = Collector()
    p = mg.Pipeline("pair")
    p.producer(lambda: range(PAIR_ITEMS), name="source")
    p.processor(
        pairs.add_one_async if first.runs_async else pairs.add_one, name="first", **first.options
    )
    p.processor(
        pairs.triple_async if second.runs_async else pairs.triple, name="second", **second.options
    )
    p.consumer(got.add, name="sink")
    strategies = {first.options["strategy"], second.options["strategy"]}
    if strategies & FORKING and strategies & SUBINTERPRETERS:
        with pytest.raises(mg.DefinitionError, match="101437"):
            p.run()
        assert got.counter() == collections.Counter()
        return
    assert p.run().status == "ok"
    assert got.counter() == collections.Counter((x + 1) * 3 for x in range(PAIR_ITEMS))


BATCHED_ITEMS, BATCH = 23, 5


def _each_strategy() -> Iterator[Any]:
    for case in REGISTRY:
        marks = [pytest.mark.ray] if case.needs_ray else []
        yield pytest.param(case, id=str(case), marks=marks)


@pytest.mark.parametrize("case", list(_each_strategy()))
def test_a_stage_of_any_strategy_behind_an_accumulator_gets_every_batch_once(case):
    """The seam after an accumulator: a stage fed only by accumulators hands its spent
    batches back to be released by the thread that made their items (docs/architecture.md),
    and each batch still reaches it exactly once, on every strategy."""
    if why := case.unavailable():
        pytest.skip(why)
    got = Collector()
    p = mg.Pipeline("batched")
    p.producer(lambda: range(BATCHED_ITEMS), name="source")
    p.accumulator(name="batch", max_size=BATCH)
    p.processor(pairs.total_async if case.runs_async else pairs.total, name="total", **case.options)
    p.consumer(got.add, name="sink")
    assert p.run().status == "ok"
    batches = [range(i, min(i + BATCH, BATCHED_ITEMS)) for i in range(0, BATCHED_ITEMS, BATCH)]
    assert got.counter() == collections.Counter(sum(b) for b in batches)
