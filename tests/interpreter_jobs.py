"""Stages for tests/test_interpreters.py, in a module of their own: a subinterpreter
worker imports the stage's module by name, and this one imports nothing but minigun (not
pytest), so it loads quickly in a fresh interpreter."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import flaky_job

import minigun as mg

try:  # CPython 3.13+: which interpreter runs the code
    import _interpreters
except ImportError:
    _interpreters = None


Refused = flaky_job.Refused


class Flaky(flaky_job.Flaky):
    """Items fail their first ``fails`` attempts (counted per worker copy), with emits
    before the failure that must never arrive; ``self.emit`` and ``emit(to=)`` in use."""

    max_interpreters = 2

    @mg.processor(strategy="interpreters", interpreters=2, retries=2, to=["sink", "odd_sink"])
    def work(self, x):
        self.attempt(x)


class Snapshot(mg.Task):
    """The worker sees the Task instance as it was when the run started, and its
    before_worker/after_worker hooks run in the worker (in the subinterpreter)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.label = "before"
        self.got: list[object] = []

    @mg.producer
    def source(self):
        yield from range(6)

    @mg.before_worker(stage="work")
    def connect(self):
        self.connection = f"connection in interpreter {_interpreter_id()}"
        _log_hook(self.folder, "open", self.connection)

    @mg.after_worker(stage="work")
    def disconnect(self):
        _log_hook(self.folder, "close", self.connection)

    @mg.processor(strategy="interpreters", interpreters=2)
    def work(self, x):
        return (x, self.label, self.connection, _interpreter_id())

    @mg.consumer(strategy="threads")
    def sink(self, value):
        self.got.append(value)


class Unpicklable(mg.Task):
    """A Task whose state cannot be copied into a subinterpreter (a lock)."""

    def __init__(self):
        self.lock = threading.Lock()

    @mg.producer
    def source(self):
        yield 1

    @mg.processor(strategy="interpreters")
    def work(self, x):
        return x

    @mg.consumer
    def sink(self, x):
        pass


class ForkBesideSubinterpreters(mg.Task):
    """A Task that forks in one stage and runs subinterpreters in the next: refused."""

    @mg.producer
    def source(self):
        yield from range(3)

    @mg.processor(strategy="spawn_fork")
    def forked(self, x):
        return x

    @mg.processor(strategy="interpreters")
    def sub(self, x):
        return x

    @mg.consumer
    def sink(self, x):
        pass


class Totals(mg.Stage):
    """A custom Stage with per-worker state; close() emits the worker's total."""

    def open(self):
        self.total = 0
        self.where = _interpreter_id()

    def process(self, item):
        self.total += item
        return ("item", item)

    def close(self):
        self.emit(("total", self.total, self.where))


def crash(item):
    raise Refused(f"no good: {item}")


def alive_marker(folder: str, x: int, wait_for_company: float = 0.5) -> int:
    """The most items seen in progress at once (each holds a marker file for a while).
    An item alone holds on (up to ``wait_for_company`` seconds), so that slow starts of
    subinterpreters on a loaded machine do not hide the overlap."""
    mine = os.path.join(folder, f"{x}.alive")
    open(mine, "w").close()
    time.sleep(0.05)
    alive = _markers(folder)
    deadline = time.monotonic() + wait_for_company
    while alive < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
        alive = max(alive, _markers(folder))
    os.remove(mine)
    return alive


def _markers(folder: str) -> int:
    return sum(name.endswith(".alive") for name in os.listdir(folder))


def in_interpreter(_item):
    return _interpreter_id()


def slow(item):
    time.sleep(0.02)
    return item


PR_GET_TIMERSLACK = 30  # Linux's prctl option


def timer_slack(_item) -> int:
    """This thread's timer slack in nanoseconds."""
    return int(ctypes.CDLL(None).prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0))


def _interpreter_id() -> int:
    return int(_interpreters.get_current()[0]) if _interpreters is not None else 0


def _log_hook(folder: str, event: str, connection: str) -> None:
    """One line per hook call, in the order they ran: a short append is one ``write``,
    so two subinterpreters' lines never interleave."""
    with open(os.path.join(folder, "worker_hooks"), "a") as f:
        f.write(f"{event} {connection}\n")


def misroute(item):
    mg.emit(item, to="nowhere")
