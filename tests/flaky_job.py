"""The job the subinterpreter and Ray tests share (tests/interpreter_jobs.py,
tests/ray_jobs.py): items fail their first ``fails`` attempts, emitting first what must
never arrive, with ``self.emit`` and ``emit(to=)`` in use. Here ``work`` runs on threads;
each of those modules declares it again with its own strategy (a stage declared again in
a subclass keeps its place in the pipeline). This one imports nothing but minigun, so a
subinterpreter loads it quickly."""

from __future__ import annotations

import os

import minigun as mg


class Refused(ValueError):
    """The error a stage raises on purpose (a module-level class, so it pickles)."""


class Flaky(mg.Task):
    """A subclass declares ``work`` again with its strategy, ``retries=2`` and
    ``to=["sink", "odd_sink"]``, calling :meth:`attempt`."""

    def __init__(self, n: int, fails: int):
        self.n, self.fails = n, fails
        self.tried: dict[int, int] = {}
        self.out: list[object] = []
        self.odd: list[object] = []
        self.errors: list[tuple[str, object, str]] = []

    def attempt(self, x: int) -> None:
        """One attempt at ``x``; attempts are counted per worker copy of the Task."""
        tried = self.tried[x] = self.tried.get(x, 0) + 1
        if tried <= self.fails:
            self.emit(("poison", x))
            raise Refused(f"attempt {tried} at {x}")
        if x % 2:
            mg.emit(("odd", x, os.getpid()), to="odd_sink")
        else:
            self.emit(("even", x, os.getpid()), to="sink")

    @mg.producer
    def source(self):
        yield from range(self.n)

    @mg.processor(strategy="threads", retries=2, to=["sink", "odd_sink"])
    def work(self, x):
        self.attempt(x)

    @mg.consumer(strategy="threads")
    def sink(self, value):
        self.out.append(value)

    @mg.consumer(strategy="threads")
    def odd_sink(self, value):
        self.odd.append(value)

    @mg.on_error(Refused)
    def failed(self, error, item, stage):
        self.errors.append((type(error).__name__, item, stage))
