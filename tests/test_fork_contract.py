"""The item contract across the process boundary: what a fork stage does with a bad item, a
dying worker or a custom Stage is what the threads strategy does with the same job."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest
from _mg_helpers import emits_then_fails, yields_then_fails

import minigun as mg

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

N = 1000
BAD = 500


def run_with_one_bad_item(strategy, work, items=None):
    """Run ``work`` over ``items`` (default ``range(N)``) in one stage of ``strategy``;
    returns (delivered values, [(item, error) for each on_error call], result)."""
    out, errors = [], []
    lock = threading.Lock()
    p = mg.Pipeline("bad_item", config={"max_processes": 2})
    source = list(range(N)) if items is None else items
    p.producer(lambda: iter(source), name="gen")
    p.processor(
        work,
        name="work",
        strategy=strategy,
        **({"processes": 2} if strategy == "fork_ipc" else {"threads": 2}),
    )

    @p.consumer(name="sink")
    def sink(value):
        with lock:
            out.append(value)

    @p.on_error(Exception)
    def handle(error, item, stage):
        with lock:
            errors.append((item, error))

    result = p.run()
    return out, errors, result


@pytest.mark.parametrize("strategy", ["threads", "fork_ipc"])
def test_an_unpicklable_result_fails_only_its_own_item(strategy):
    def work(x):
        return threading.Lock() if x == BAD else x

    out, errors, result = run_with_one_bad_item(strategy, work)
    if strategy == "threads":  # a lock needs no pickling in-process
        assert len(out) == N and not errors
        return
    assert sorted(out) == [x for x in range(N) if x != BAD]
    assert [item for item, _ in errors] == [BAD]
    assert "pickle" in str(errors[0][1]).lower() and "'work'" in str(errors[0][1])
    assert result.status == "ok" and result.stats["work"].errors == 1


@pytest.mark.parametrize("strategy", ["threads", "fork_ipc"])
def test_an_unpicklable_input_fails_only_its_own_item(strategy):
    items = list(range(N))
    items[BAD] = threading.Lock()

    out, errors, result = run_with_one_bad_item(strategy, lambda x: x, items)
    if strategy == "threads":
        assert len(out) == N and not errors
        return
    assert sorted(out) == [x for x in range(N) if x != BAD]
    assert [item for item, _ in errors] == [items[BAD]]
    assert isinstance(errors[0][1], mg.WorkerError)
    assert "pickle" in str(errors[0][1]).lower() and "'work'" in str(errors[0][1])
    assert result.stats["work"].errors == 1


@pytest.mark.parametrize("strategy", ["threads", "fork_ipc"])
def test_an_emit_to_a_stage_not_downstream_fails_only_its_own_item(strategy):
    def work(x):
        if x == BAD:
            mg.emit(x, to="gen")
        return x

    out, errors, result = run_with_one_bad_item(strategy, work)
    assert sorted(out) == [x for x in range(N) if x != BAD]
    assert [item for item, _ in errors] == [BAD]
    assert isinstance(errors[0][1], mg.RoutingError)
    assert "'gen'" in str(errors[0][1])
    assert result.stats["work"].errors == 1


def test_a_failing_after_fork_hook_fails_each_item_of_that_worker_one_by_one(tmp_path):
    flag = tmp_path / "failed-once"
    out, errors = [], []

    p = mg.Pipeline("after_fork_fails")
    p.producer(lambda: range(N), name="gen")
    p.processor(lambda x: x, name="work", strategy="fork_ipc")
    p.consumer(out.append, name="sink")

    @p.after_fork
    def fail_first_worker():
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        raise ConnectionError("no database in the first worker")

    @p.on_error(ConnectionError)
    def handle(error, item, stage):
        errors.append(item)

    result = p.run()
    assert errors, "the first worker's items should have failed"
    assert all(isinstance(item, int) for item in errors), "on_error got a whole chunk"
    assert sorted(out + errors) == list(range(N))
    assert result.stats["work"].errors == len(errors)


class OpensNothing(mg.Stage):
    def open(self):
        raise ConnectionError(f"stage {self.name!r} cannot connect")

    def process(self, item):
        return item


def test_a_failing_open_fails_each_item_of_that_worker_one_by_one():
    errors = []
    p = mg.Pipeline("open_fails")
    p.producer(lambda: range(50), name="gen")
    p.add(OpensNothing("opens", strategy="fork_ipc"))

    @p.on_error(ConnectionError)
    def handle(error, item, stage):
        errors.append(item)

    p.run()
    assert sorted(errors) == list(range(50))


@pytest.mark.parametrize("strategy", ["threads", "fork_ipc"])
def test_a_failing_open_without_a_handler_fails_the_run_with_that_error(strategy):
    p = mg.Pipeline("open_fails")
    p.producer(lambda: range(50), name="gen")
    p.add(OpensNothing("opens", strategy=strategy))
    with pytest.raises(mg.PipelineError) as caught:
        p.run()
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert caught.value.result.status == "failed"


def test_values_of_an_item_whose_worker_died_are_delivered_once(tmp_path):
    """The worker dies in the middle of an item after part of its values were sent; the
    item runs again in a fresh worker, and each value arrives exactly once."""
    flag = tmp_path / "killed-once"
    out = []

    def work(x):
        for k in range(10):
            yield (x, k)
            if k == 4:
                time.sleep(0.06)  # the child flushes what it buffered (50 ms)
        if x == 7:
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    p = mg.Pipeline("died")
    p.producer(lambda: range(20), name="gen")
    p.processor(work, name="work", strategy="fork_ipc")
    p.consumer(out.append, name="sink")
    result = p.run()
    counts = collections.Counter(out)
    assert sorted(counts) == [(x, k) for x in range(20) for k in range(10)]
    assert set(counts.values()) == {1}, [v for v, c in counts.items() if c > 1][:10]
    assert result.status == "ok" and result.stats["work"].errors == 0


def test_an_item_that_always_kills_its_worker_fails_alone_and_others_arrive_once():
    out, errors = [], []

    def work(x):
        for k in range(10):
            yield (x, k)
            if k == 4:
                time.sleep(0.06)
        if x == 7:
            os.kill(os.getpid(), signal.SIGKILL)

    p = mg.Pipeline("dies")
    p.producer(lambda: range(20), name="gen")
    p.processor(work, name="work", strategy="fork_ipc")
    p.consumer(out.append, name="sink")

    @p.on_error(mg.WorkerError)
    def handle(error, item, stage):
        errors.append(item)

    p.run()
    assert errors == [7]
    counts = collections.Counter(out)
    assert {v for v in counts if v[0] != 7} == {
        (x, k) for x in range(20) if x != 7 for k in range(10)
    }
    assert set(counts.values()) == {1}


class Buffering(mg.Stage):
    """Collects its items in process() and emits their sum in close()."""

    def open(self):
        self.pid = os.getpid()
        self.seen = []

    def process(self, batch):
        self.seen.extend(batch)

    def close(self):
        self.emit(("sum", self.pid, os.getpid(), sum(self.seen)))


def test_a_custom_stage_buffering_until_close_keeps_everything_under_spawn_fork():
    out = []
    p = mg.Pipeline("buffering")
    p.producer(lambda: range(100), name="gen")
    p.accumulator(name="batch", max_size=10)
    p.add(Buffering("sums", strategy="spawn_fork"))
    p.consumer(out.append, name="sink")
    p.run(max_processes=2)
    assert sum(total for _, _, _, total in out) == sum(range(100))
    # open, process and close ran in one child, not in this process
    assert all(opened == closed != os.getpid() for _, opened, closed, _ in out)


class Attempts(mg.Stage):
    """Records each attempt in its worker; item 1 fails its first attempt, item 2 every
    attempt; close() reports what the worker saw."""

    def open(self):
        self.pid = os.getpid()
        self.seen = []

    def process(self, x):
        self.seen.append(x)
        if x == 2 or (x == 1 and self.seen.count(1) == 1):
            raise RuntimeError(f"attempt of {x} fails")
        return ("out", x)

    def close(self):
        self.emit(("closed", self.pid, tuple(self.seen)))


def test_a_spawn_fork_child_retries_its_item_itself_and_close_emits_once():
    """One child per item runs the item's retries: the worker is opened once, sees every
    attempt, and what close() emits arrives once, whether the item succeeded after a retry
    or failed (handled)."""
    out, errors = [], []
    p = mg.Pipeline("attempts")
    p.producer(lambda: range(3), name="gen")
    p.add(Attempts("work", strategy="spawn_fork", retries=1, retry_backoff=0.001))
    p.consumer(out.append, name="sink")

    @p.on_error(RuntimeError)
    def handle(error, item, stage):
        errors.append(item)

    result = p.run(max_processes=2)
    assert sorted(v[1] for v in out if v[0] == "out") == [0, 1]
    closed = sorted(v[2] for v in out if v[0] == "closed")
    assert closed == [(0,), (1, 1), (2, 2)], "one worker per item, every attempt in it"
    assert len({v[1] for v in out if v[0] == "closed"}) == 3  # three children
    assert errors == [2]
    stats = result.stats["work"]
    assert (stats.items_in, stats.errors, stats.retries) == (3, 1, 2)


def test_an_unpicklable_spawn_fork_result_names_its_type_with_the_child_traceback():
    errors = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield [1, 2, 3]

        @mg.processor(strategy="spawn_fork")
        def work(self, batch):
            return threading.Lock()

        @mg.consumer
        def sink(self, value):
            pass

        @mg.on_error(Exception)
        def handle(self, error, item, stage):
            errors.append(error)

    Job().run()
    [error] = errors
    text = str(error)
    assert "exit code" not in text
    assert "lock" in text.lower() and "pickle" in text.lower() and "'work'" in text
    assert "Traceback" in getattr(error, "traceback_text", "")


def test_the_worker_loop_never_imports_the_extension():
    """Forked children, subinterpreters and Ray workers run minigun.worker_loop; none of
    them may load minigun._minigun, not even through another minigun module."""
    import ast
    import pathlib

    package = pathlib.Path(mg.__file__).parent
    seen, todo = set(), ["worker_loop"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name == "_minigun":
            break
        tree = ast.parse((package / f"{name}.py").read_text())
        for block in ast.walk(tree):  # imports for type checkers only do not count
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
                block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                todo += [t.split(".")[0] for t in targets]
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("minigun.")]
    assert "_minigun" not in seen, sorted(seen)


@pytest.mark.parametrize("work", [emits_then_fails, yields_then_fails], ids=["emit", "generator"])
@pytest.mark.parametrize("strategy", ["spawn_fork", "fork_ipc"])
def test_a_failed_item_without_retries_delivers_nothing_from_a_child(strategy, work):
    """spawn_fork: the parent holds what the child streams back as the attempt's output;
    fork_ipc: the worker loop holds each attempt's values. Either way a failed item
    delivers nothing, as from a thread."""
    items = list(range(10))
    out, errors, result = run_with_one_bad_item(strategy, work, items)
    evens = range(0, 10, 2)
    assert sorted(out) == sorted([("early", x) for x in evens] + [("out", x) for x in evens])
    assert sorted(item for item, _ in errors) == [1, 3, 5, 7, 9]
    assert result.stats["work"].items_out == len(out)
