"""Stages for tests/test_ray.py, in a module of their own: it asks for Ray strategies when
imported, which raises UnsupportedStrategy where Ray is not installed."""

from __future__ import annotations

import os
import time

import flaky_job
import ray

import minigun as mg

Refused = flaky_job.Refused


class Flaky(flaky_job.Flaky):
    """Items fail their first ``fails`` attempts (counted per actor), emitting first what
    must never arrive; ``self.emit`` and ``emit(to=)`` in use."""

    @mg.processor(strategy="ray", actors=2, retries=2, to=["sink", "odd_sink"])
    def work(self, x):
        self.attempt(x)


def crash(item):
    raise Refused(f"no good: {item}")


def kill_my_actor_at_3(item):
    """Item 3 has the Ray actor running it killed (``ray.kill`` works asynchronously: the
    item waits for it, so it is in flight when the actor dies). A run that waited for the
    item instead of noticing the death would take a minute."""
    if item == 3:
        ray.kill(ray.get_runtime_context().current_actor)
        time.sleep(60)
    return item


def kill_my_actor_from_30(item):
    """Items take 10 ms (so the ones after them queue up and travel in chunks); from item
    30 on, each has its actor killed, as kill_my_actor_at_3 does."""
    if item >= 30:
        ray.kill(ray.get_runtime_context().current_actor)
        time.sleep(60)
    time.sleep(0.01)
    return item


def slow(item):
    time.sleep(0.02)
    return item


class RecordsWorkers(mg.Stage):
    """A custom stage recording each worker's token in ``folder``: in ``opens`` when its
    open() begins, in ``closes`` when its close() ends."""

    def __init__(self, name: str, *, folder: str, **options: object) -> None:
        super().__init__(name, **options)
        self.folder = folder

    def _record(self, what: str) -> None:
        with open(os.path.join(self.folder, what), "a") as f:
            f.write(f"{self.token}\n")

    def open(self) -> None:
        self.token = f"{os.getpid()}-{time.monotonic_ns()}"
        self._record("opens")

    def close(self) -> None:
        self._record("closes")


class SlowToOpenAndClose(RecordsWorkers):
    """Workers that take their time to open and to close: a cancel lands mid-open or
    mid-close more often than not."""

    def open(self) -> None:
        super().open()
        time.sleep(0.3)

    def process(self, item):
        time.sleep(0.05)
        return item

    def close(self) -> None:
        time.sleep(0.3)
        super().close()


def _arrive_late(seconds: float) -> ArrivesLate:
    time.sleep(seconds)
    return ArrivesLate(seconds)


class ArrivesLate:
    """Takes ``seconds`` to unpickle: an actor given one comes up that much later."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[object, tuple[float]]:
        return _arrive_late, (self.seconds,)


class LateToComeUp(RecordsWorkers):
    """Workers whose Ray actor comes up ``late`` seconds after its process does (the
    stage, which the actor unpickles as it starts, holds an :class:`ArrivesLate`)."""

    def __init__(self, name: str, *, folder: str, late: float, **options: object) -> None:
        super().__init__(name, folder=folder, **options)
        self.late = ArrivesLate(late)

    def process(self, item):
        return item
