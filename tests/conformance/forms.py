"""The stage forms of the conformance matrix, and the pipelines that run them.

Every form does the same job with the same faults, written the way a user would write it:
``work(item)`` records one attempt, fails while the item says it must (after emitting a
"poison" value, which must never reach the sink: a failed attempt's outputs are discarded),
and otherwise emits ``("out", x)`` once.

Forked workers cannot append to the parent's lists, so the effects that happen inside the
stage are recorded in files, one per item and opened with ``O_APPEND`` (whole small writes
are atomic): ``<folder>/<x>.attempts`` gets one byte per attempt, ``<folder>/opens`` and
``<folder>/closes`` one line per worker ``open()``/``close()`` of a custom stage. What the
stage emits reaches the parent through the pipeline itself, to a ``sink`` consumer that
runs on threads in the parent.

The stage functions are module-level functions without closures (they read what they need
from the item), so strategies that copy functions by qualified name can run them.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass

import minigun as mg

STAGE = "work"


class Boom(ValueError):
    """The injected fault (a ValueError, so it pickles and matches ``retry_on`` defaults)."""


# -- items and recorded effects ----------------------------------------------------------------


def make_item(x: int, fail_first: int, folder: str, delay: float = 0.0) -> tuple:
    """Item ``x``: its first ``fail_first`` attempts fail; each attempt takes ``delay`` s."""
    return (x, fail_first, folder, delay)


def _append(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return os.stat(path).st_size


def attempt_fails(item: tuple) -> bool:
    """Record one attempt at ``item``; True if this attempt must fail."""
    x, fail_first, folder, delay = item
    if delay:
        time.sleep(delay)
    attempt = _append(os.path.join(folder, f"{x}.attempts"), b".")
    return attempt <= fail_first


def attempts(folder: str, x: int) -> int:
    try:
        return os.stat(os.path.join(folder, f"{x}.attempts")).st_size
    except FileNotFoundError:
        return 0


def worker_events(folder: str, kind: str) -> list[str]:
    """The tokens written by ``open()`` (``kind="opens"``) or ``close()`` (``"closes"``)."""
    try:
        with open(os.path.join(folder, kind)) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def out(item: tuple) -> tuple:
    return ("out", item[0])


def poison(item: tuple) -> tuple:
    return ("poison", item[0])


# -- the forms, as plain functions (the builder API's stages) -----------------------------------


def return_form(item):
    if attempt_fails(item):
        raise Boom(item[0])
    return out(item)


def generator_form(item):
    if attempt_fails(item):
        yield poison(item)
        raise Boom(item[0])
    yield out(item)


def emit_form(item, emit=mg.emit):
    if attempt_fails(item):
        emit(poison(item))
        raise Boom(item[0])
    emit(out(item))


async def async_return_form(item):
    await asyncio.sleep(0)
    if attempt_fails(item):
        mg.emit(poison(item))
        raise Boom(item[0])
    return out(item)


async def async_generator_form(item):
    await asyncio.sleep(0)
    if attempt_fails(item):
        yield poison(item)
        raise Boom(item[0])
    yield out(item)


class ReturnCallable:
    """The return form as a callable object, the usual shape of a stateful stage."""

    def __call__(self, item):
        return return_form(item)


class GeneratorCallable:
    """The generator form as a callable object: its ``__call__`` is a generator function."""

    def __call__(self, item):
        yield from generator_form(item)


class AsyncCallable:
    """The async return form as a callable object: its ``__call__`` is ``async def``."""

    async def __call__(self, item):
        return await async_return_form(item)


class RecordingStage(mg.Stage):
    """A custom stage with per-worker state: ``open()`` makes a token, ``process()`` needs
    it, ``close()`` records it and emits ``("close", token)`` (close may emit)."""

    def __init__(self, name: str, *, folder: str, **options) -> None:
        super().__init__(name, **options)
        self.folder = folder

    def open(self) -> None:
        self.token = uuid.uuid4().hex
        self.closed = False
        _append(os.path.join(self.folder, "opens"), f"{self.token}\n".encode())

    def _check_open(self) -> None:
        if not hasattr(self, "token") or self.closed:
            raise AssertionError("process() called on a worker that is not open")

    def process(self, item):
        self._check_open()
        if attempt_fails(item):
            self.emit(poison(item))
            raise Boom(item[0])
        return out(item)

    def close(self) -> None:
        self.closed = True
        _append(os.path.join(self.folder, "closes"), f"{self.token}\n".encode())
        self.emit(("close", self.token))


class BufferingStage(RecordingStage):
    """A custom stage that buffers in ``process()`` and emits it all in ``close()``."""

    def open(self) -> None:
        super().open()
        self.buffer = []

    def process(self, item):
        self._check_open()
        if attempt_fails(item):
            self.emit(poison(item))
            raise Boom(item[0])
        self.buffer.append(out(item))

    def close(self) -> None:
        for value in self.buffer:
            self.emit(value)
        super().close()


class AsyncRecordingStage(RecordingStage):
    """The same custom stage with an ``async def process``."""

    async def process(self, item):
        self._check_open()
        await asyncio.sleep(0)
        if attempt_fails(item):
            self.emit(poison(item))
            raise Boom(item[0])
        return out(item)


# -- the forms, as Task methods (the class DSL's stages) ----------------------------------------


def _task_return(self, item):
    return return_form(item)


def _task_generator(self, item):
    yield from generator_form(item)


def _task_emit(self, item):
    emit_form(item, self.emit)


async def _task_async_return(self, item):
    return await async_return_form(item)


async def _task_async_generator(self, item):
    async for value in async_generator_form(item):
        yield value


@dataclass(frozen=True)
class Form:
    name: str
    is_async: bool
    function: object = None  # the builder API's stage function
    method: object = None  # the class DSL's stage method
    stage_class: type | None = None  # a custom mg.Stage subclass instead of a function

    @property
    def is_custom(self) -> bool:
        return self.stage_class is not None

    def written_in(self, api: str) -> bool:
        """Whether the form exists in ``api``: a callable object has no Task method."""
        return api == "builder" or self.is_custom or self.method is not None

    def __str__(self) -> str:
        return self.name


FORMS = [
    Form("return", False, return_form, _task_return),
    Form("generator", False, generator_form, _task_generator),
    Form("emit", False, emit_form, _task_emit),
    Form("stage", False, stage_class=RecordingStage),
    Form("buffering_stage", False, stage_class=BufferingStage),
    Form("callable", False, ReturnCallable()),
    Form("generator_callable", False, GeneratorCallable()),
    Form("async_return", True, async_return_form, _task_async_return),
    Form("async_generator", True, async_generator_form, _task_async_generator),
    Form("async_stage", True, stage_class=AsyncRecordingStage),
    Form("async_callable", True, AsyncCallable()),
]

APIS = ["builder", "task"]


# -- pipelines ----------------------------------------------------------------------------------


@dataclass
class Job:
    """What a test needs to build one pipeline of the matrix."""

    form: Form
    options: dict  # the stage options: strategy, workers, retries, ...
    items: object  # a zero-argument callable returning the items
    sink: object  # ``.add(value)``, thread-safe, in the parent
    errors: object | None  # ``.add((type, item, stage))``; None: no on_error handler
    folder: str


def build_pipeline(job: Job) -> mg.Pipeline:
    p = mg.Pipeline("conformance")
    p.producer(job.items, name="source")
    if job.form.is_custom:
        p.add(job.form.stage_class(STAGE, folder=job.folder, **job.options))
    else:
        p.processor(job.form.function, name=STAGE, **job.options)
    p.consumer(job.sink.add, name="sink", strategy="threads")
    if job.errors is not None:
        errors = job.errors
        p.on_error(Boom)(lambda error, item, stage: errors.add((type(error), item, stage)))
    return p


def _task_init(self, job):
    self.job = job


def _task_source(self):
    yield from self.job.items()


def _task_sink(self, value):
    self.job.sink.add(value)


def _task_on_error(self, error, item, stage):
    self.job.errors.add((type(error), item, stage))


def build_task(job: Job) -> mg.Task:
    """The same pipeline as a Task class (made when called, as a class statement would)."""
    if job.form.is_custom:
        work = job.form.stage_class(STAGE, folder=job.folder, **job.options)
    else:
        work = mg.processor(name=STAGE, **job.options)(job.form.method)
    body = {
        "__init__": _task_init,
        "source": mg.producer(name="source")(_task_source),
        STAGE: work,
        "sink": mg.consumer(name="sink", strategy="threads")(_task_sink),
    }
    if job.errors is not None:
        body["failed"] = mg.on_error(Boom)(_task_on_error)
    task_class = type("ConformanceJob", (mg.Task,), body)
    return task_class(job)


def build(api: str, job: Job):
    """The runnable object (``.run()``, ``.start()``) of ``job`` in the given API."""
    return build_pipeline(job) if api == "builder" else build_task(job)
