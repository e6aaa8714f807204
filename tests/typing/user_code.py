"""A typed user file: every decorator form, checked with ``mypy --strict`` by the suite
(tests/test_typing.py). If a decorator loses the function's type, mypy fails here."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import minigun as mg


class Job(mg.Task):
    max_threads = 4

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    @mg.producer
    def numbers(self) -> Iterator[int]:
        yield from range(10)

    @mg.producer(auto_start=False, total=3, to="double")
    def more(self) -> list[int]:
        return [1, 2, 3]

    @mg.processor(threads=2, strategy="threads", retries=1, retry_on=ValueError)
    def double(self, n: int) -> int:
        """Twice the item."""
        return n * 2

    @mg.processor
    def plain(self, n: int) -> int:
        return n

    @mg.accumulator(max_size=100, max_wait=0.5)
    def batch(self, items: list[int]) -> list[int]:
        return items

    tail = mg.accumulator("tail", max_size=10)

    @mg.consumer(strategy="spawn_fork", queue_size=10)
    def save(self, items: list[int]) -> None:
        assert self.conn is not None

    @mg.consumer
    def last(self, items: list[int]) -> None:
        pass

    @mg.before_run
    def begin(self) -> None:
        self.trigger("more")

    @mg.after_run(prepend=True)
    def end(self) -> None:
        pass

    @mg.before("double")
    def before_double(self) -> None:
        pass

    @mg.after("double")
    def after_double(self) -> None:
        pass

    @mg.before_fork
    def forking(self) -> None:
        pass

    @mg.after_fork("save")
    def forked(self) -> None:
        pass

    @mg.before_worker(stage="save")
    def connect(self) -> None:
        self.conn = sqlite3.connect(self.path)

    @mg.after_worker
    def disconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()

    @mg.on_error(ValueError, KeyError, stage="double")
    def handle(self, error: BaseException, item: object, stage: str) -> None:
        pass

    @mg.on_error
    def handle_any(self, error: BaseException, item: object, stage: str) -> None:
        pass


def use_job() -> int:
    job = Job("x.db")
    doubled: int = job.double(2)  # still a method returning int
    try:
        result = job.run(max_threads=2)
    except mg.PipelineError as exc:
        result = exc.result  # a RunResult, never None
    data: dict[str, object] = result.to_dict()
    print(result.summary(), data, result.stats["double"].latency_p50)
    return doubled


def builder() -> mg.RunResult:
    p = mg.Pipeline("etl", config={"max_threads": 8})

    @p.producer
    def numbers() -> Iterator[int]:
        yield from range(100)

    @p.processor(threads=4, name="double")
    def double(x: int) -> int:
        return x * 2

    batch: mg.Stage = p.accumulator(name="batch", max_size=10)
    p.consumer(print)
    p.before_worker(lambda: None, stage="double")
    run = p.start(progress=True)
    print(batch, numbers, double, run.stats)
    return run.wait(timeout=10)
