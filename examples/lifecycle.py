"""Hooks, retries, error handling and background runs: python examples/lifecycle.py"""

import random
from collections.abc import Iterator

import minigun as mg


class Import(mg.Task):
    max_retries = 5

    def __init__(self) -> None:
        self.log: list[str] = []
        self.rng = random.Random(1)
        self.saved: list[int] = []

    @mg.before_run
    def connect(self) -> None:
        self.log.append("connect")

    @mg.after_run
    def disconnect(self) -> None:  # runs even when the run fails
        self.log.append("disconnect")

    @mg.producer
    def rows(self) -> Iterator[int]:
        yield from range(20)

    @mg.processor(retries=3, retry_on=(TimeoutError,), retry_backoff=0.001)
    def fetch(self, row: int) -> int:
        if self.rng.random() < 0.3:
            raise TimeoutError(f"row {row} timed out")  # retried, up to 3 times
        if row == 13:
            raise ValueError("row 13 is corrupt")  # not retried: goes to on_error
        return row

    @mg.consumer
    def save(self, row: int) -> None:
        self.saved.append(row)

    @mg.on_error(ValueError, TimeoutError)
    def skip_bad_row(self, error: BaseException, item: object, stage: str) -> None:
        self.log.append(f"skipped {item} in {stage}: {error}")


class Waiting(mg.Task):
    """A producer that starts only when triggered."""

    def __init__(self) -> None:
        self.got: list[str] = []

    @mg.producer(auto_start=False)
    def on_demand(self) -> Iterator[str]:
        yield from "abc"

    @mg.consumer
    def keep(self, x: str) -> None:
        self.got.append(x)


if __name__ == "__main__":
    job = Import()
    result = job.run()
    print(result.summary())
    print("\n".join(job.log))
    assert job.log[0] == "connect" and job.log[-1] == "disconnect"
    assert 13 not in job.saved and result.stats["fetch"].errors >= 1

    waiting = Waiting()
    run = waiting.start()  # runs in the background
    run.trigger("on_demand")
    print(run.wait(timeout=5).status, waiting.got)
    assert waiting.got == ["a", "b", "c"]
