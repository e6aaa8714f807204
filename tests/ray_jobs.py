"""Stages for tests/test_ray.py, in a module of their own: it asks for Ray strategies when
imported, which raises UnsupportedStrategy where Ray is not installed."""

from __future__ import annotations

import os
import time

import ray

import minigun as mg


class Refused(ValueError):
    """The error a stage raises on purpose."""


class Flaky(mg.Task):
    """Items fail their first ``fails`` attempts (counted per actor), emitting first what
    must never arrive; ``self.emit`` and ``emit(to=)`` in use."""

    def __init__(self, n: int, fails: int):
        self.n, self.fails = n, fails
        self.tried: dict[int, int] = {}
        self.out: list[object] = []
        self.odd: list[object] = []
        self.errors: list[tuple[str, object, str]] = []

    @mg.producer
    def source(self):
        yield from range(self.n)

    @mg.processor(strategy="ray", actors=2, retries=2, to=["sink", "odd_sink"])
    def work(self, x):
        tried = self.tried[x] = self.tried.get(x, 0) + 1
        if tried <= self.fails:
            self.emit(("poison", x))
            raise Refused(f"attempt {tried} at {x}")
        if x % 2:
            mg.emit(("odd", x, os.getpid()), to="odd_sink")
        else:
            self.emit(("even", x, os.getpid()), to="sink")

    @mg.consumer(strategy="threads")
    def sink(self, value):
        self.out.append(value)

    @mg.consumer(strategy="threads")
    def odd_sink(self, value):
        self.odd.append(value)

    @mg.on_error(Refused)
    def failed(self, error, item, stage):
        self.errors.append((type(error).__name__, item, stage))


def crash(item):
    raise Refused(f"no good: {item}")


def kill_my_actor_at_3(item):
    """Item 3 has the Ray actor running it killed (``ray.kill`` works asynchronously: the
    item waits for it, so it is in flight when the actor dies)."""
    if item == 3:
        ray.kill(ray.get_runtime_context().current_actor)
        time.sleep(5)
    return item


def slow(item):
    time.sleep(0.02)
    return item


class SlowToOpenAndClose(mg.Stage):
    """A custom stage whose workers take their time to open and to close, recording each
    token (``opens`` when open() begins, ``closes`` when close() ends) in ``folder``: a
    cancel lands mid-open or mid-close more often than not."""

    def __init__(self, name: str, *, folder: str, **options: object) -> None:
        super().__init__(name, **options)
        self.folder = folder

    def _record(self, what: str) -> None:
        with open(os.path.join(self.folder, what), "a") as f:
            f.write(f"{self.token}\n")

    def open(self) -> None:
        self.token = f"{os.getpid()}-{time.monotonic_ns()}"
        self._record("opens")
        time.sleep(0.3)

    def process(self, item):
        time.sleep(0.05)
        return item

    def close(self) -> None:
        time.sleep(0.3)
        self._record("closes")
