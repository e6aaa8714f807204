"""before_worker / after_worker: per-worker hooks on the worker's own thread and process,
and before("stage") / after("stage") on one thread (API.md section 4)."""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref

import pytest

import minigun as mg


def _where() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


class Threads(mg.Task):
    """Each worker records where its hooks and items ran into a list the parent sees."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, tuple[int, int]]] = []

    def note(self, what: str, stage: str) -> None:
        with self.lock:
            self.events.append((what, stage, _where()))

    @mg.producer
    def numbers(self):
        yield from range(200)

    @mg.processor(threads=3)
    def work(self, n):
        self.note("item", "work")
        return n

    @mg.consumer(strategy="spawn_thread", threads=2)
    def sink(self, n):
        self.note("item", "sink")

    @mg.before_worker(stage=["work", "sink"])
    def connect(self):
        self.note("before", "?")

    @mg.after_worker(stage=["work", "sink"])
    def disconnect(self):
        self.note("after", "?")


def test_worker_hooks_run_on_each_worker_thread_around_its_items():
    job = Threads()
    job.run()
    by_thread: dict[tuple[int, int], list[str]] = {}
    for what, _stage, where in job.events:
        by_thread.setdefault(where, []).append(what)
    item_threads = {where for what, _s, where in job.events if what == "item"}
    for where in item_threads:
        seq = by_thread[where]
        assert seq[0] == "before" and seq[-1] == "after", seq
        assert where[0] == os.getpid() and where[1] != threading.get_ident()
    work_threads = {w for what, s, w in job.events if what == "item" and s == "work"}
    assert 1 <= len(work_threads) <= 3
    # spawn_thread: every item has a thread of its own, and so its own before/after.
    sink_items = [w for what, s, w in job.events if what == "item" and s == "sink"]
    assert len(sink_items) == 200


def test_pipeline_wide_worker_hook_runs_in_every_worker_including_producers():
    hooked, worked = [], {}
    lock = threading.Lock()
    p = mg.Pipeline("p")

    def note(stage):
        with lock:
            worked.setdefault(stage, set()).add(threading.get_ident())

    @p.producer
    def numbers():
        note("numbers")
        yield from range(10)

    p.processor(lambda n: note("work") or n, name="work", threads=2)
    p.accumulator(name="batch", max_size=5)
    p.consumer(lambda b: note("sink"), name="sink")

    worker_state = threading.local()

    @p.before_worker
    def hello():
        # Each worker starts with thread-local state of its own, also where it runs on an
        # OS thread that an earlier worker of the run had parked (docs/lifecycle.md).
        fresh = not hasattr(worker_state, "greeted")
        worker_state.greeted = True
        with lock:
            hooked.append((threading.get_ident(), fresh))

    p.run()
    # One call per worker: the producer, two work threads, the accumulator, the sink.
    assert [fresh for _, fresh in hooked] == [True] * 5
    assert set().union(*worked.values()) <= {thread for thread, _ in hooked}


@pytest.mark.parametrize("api", ["builder", "task"])
def test_a_workers_thread_locals_are_released_when_it_ends_while_later_stages_run(api):
    """A worker's thread ends once its own stage is done, not when the whole run is: what
    it keeps per thread (a connection in a threading.local) is released then."""
    per_thread = threading.local()
    released = threading.Event()
    seen_by_the_consumer: list[bool] = []

    class Connection:
        pass

    def connect():
        per_thread.connection = Connection()
        weakref.finalize(per_thread.connection, released.set)

    def sink(n):
        if n == 2:
            seen_by_the_consumer.append(released.wait(timeout=5))

    if api == "builder":
        p = mg.Pipeline("p")
        p.before_worker(connect, stage="numbers")
        p.producer(lambda: iter(range(3)), name="numbers")
        p.consumer(sink, name="sink")
        p.run()
    else:

        class Job(mg.Task):
            @mg.before_worker(stage="numbers")
            def open_connection(self):
                connect()

            @mg.producer
            def numbers(self):
                yield from range(3)

            @mg.consumer
            def save(self, n):
                sink(n)

        Job().run()
    assert seen_by_the_consumer == [True]


class ForkedSqlite(mg.Task):
    """The job that fails without per-worker hooks: a connection per worker process."""

    max_processes = 2

    def __init__(self, path: str, strategy: str) -> None:
        self.path = path
        self.strategy = strategy
        self.conn: sqlite3.Connection | None = None

    @mg.producer
    def numbers(self):
        yield from range(300)

    batch = mg.accumulator("batch", max_size=50)

    @mg.consumer(strategy="fork_ipc", processes=2)
    def save_ipc(self, batch):
        assert self.conn is not None
        self.conn.executemany("INSERT INTO t VALUES (?, ?)", [(n, os.getpid()) for n in batch])

    @mg.before_worker(stage="save_ipc")
    def connect(self):
        self.conn = sqlite3.connect(self.path, timeout=30)

    @mg.after_worker(stage="save_ipc")
    def commit(self):
        assert self.conn is not None
        self.conn.commit()
        self.conn.close()


def _table(path):
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (n INTEGER, pid INTEGER)")


def test_fork_ipc_workers_open_their_own_connection(tmp_path):
    path = str(tmp_path / "out.db")
    _table(path)
    ForkedSqlite(path, "fork_ipc").run()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT n, pid FROM t").fetchall()
    assert sorted(n for n, _ in rows) == list(range(300))
    assert os.getpid() not in {pid for _, pid in rows}


def test_spawn_fork_children_run_worker_hooks_in_the_child(tmp_path):
    path = str(tmp_path / "out.db")
    _table(path)

    class SpawnFork(mg.Task):
        max_processes = 2

        @mg.producer
        def numbers(self):
            yield from range(100)

        batch = mg.accumulator("batch", max_size=10)

        @mg.consumer(strategy="spawn_fork")
        def save(self, batch):
            self.conn.executemany("INSERT INTO t VALUES (?, ?)", [(n, os.getpid()) for n in batch])

        @mg.before_worker(stage="save")
        def connect(self):
            self.conn = sqlite3.connect(path, timeout=30)

        @mg.after_worker(stage="save")
        def commit(self):
            self.conn.commit()
            self.conn.close()

    SpawnFork().run()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT n, pid FROM t").fetchall()
    assert sorted(n for n, _ in rows) == list(range(100))
    pids = {pid for _, pid in rows}
    assert os.getpid() not in pids and len(pids) == 10  # one child per batch


def test_async_stage_hooks_run_on_its_loop_thread():
    import asyncio  # noqa: PLC0415

    where = {}

    class Fetch(mg.Task):
        @mg.producer
        def numbers(self):
            yield from range(20)

        @mg.processor(concurrency=5)
        async def fetch(self, n):
            where.setdefault("item", set()).add(threading.get_ident())
            await asyncio.sleep(0)
            return n

        @mg.before_worker(stage="fetch")
        def open_session(self):
            where["before"] = threading.get_ident()

        @mg.after_worker(stage="fetch")
        def close_session(self):
            where["after"] = threading.get_ident()

    Fetch().run()
    assert where["item"] == {where["before"]} == {where["after"]}


def test_custom_stage_hooks_wrap_open_and_close():
    order = []

    class Probe(mg.Stage):
        def open(self):
            order.append("open")

        def process(self, item):
            return item

        def close(self):
            order.append("close")

    p = mg.Pipeline("p")
    p.producer(lambda: range(3), name="numbers")
    p.add(Probe("probe"))
    p.before_worker(lambda: order.append("before"), stage="probe")
    p.after_worker(lambda: order.append("after"), stage="probe")
    p.run()
    assert order == ["before", "open", "close", "after"]


def test_worker_hook_errors_fail_the_run_naming_the_stage():
    p = mg.Pipeline("p")
    p.producer(lambda: range(3), name="numbers")
    p.processor(lambda n: n, name="work")

    @p.before_worker(stage="work")
    def broken():
        raise ConnectionError("db down")

    with pytest.raises(mg.PipelineError, match=r"'work'.*ConnectionError: db down"):
        p.run()


def test_worker_hook_stage_must_be_names():
    with pytest.raises(mg.DefinitionError, match="stage="):
        mg.before_worker(stage=[3])


@pytest.mark.parametrize("background", [False, True])
def test_before_and_after_stage_run_on_the_same_thread(background):
    threads = {}

    class Job(mg.Task):
        @mg.producer
        def numbers(self):
            yield from range(50)

        @mg.processor(threads=2)
        def work(self, n):
            return n

        @mg.before("work")
        def setup(self):
            threads["before"] = threading.get_ident()

        @mg.after("work")
        def teardown(self):
            threads["after"] = threading.get_ident()

    if background:
        Job().start().wait(10)
    else:
        Job().run()
        assert threads["before"] == threading.get_ident()
    assert threads["before"] == threads["after"]


def test_after_stage_error_still_fails_the_run():
    p = mg.Pipeline("p")
    p.producer(lambda: range(3), name="numbers")
    p.processor(lambda n: n, name="work")
    p.after("work")(lambda: 1 / 0)
    with pytest.raises(mg.PipelineError, match="ZeroDivisionError") as info:
        p.run()
    assert info.value.result.status == "failed"
