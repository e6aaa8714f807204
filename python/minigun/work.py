"""The executor interface: a stage's code, and the work the runtime's threads run for it.

Every strategy is an :class:`Executor`: it takes a stage's :class:`StageCode` (what the
user wrote, ready to call) and its plan, and returns the stage's :class:`Work`, what the
Rust runtime's worker threads run. There are two kinds:

* **In process** (inline, threads, spawn_thread): the work is the stage's own call. The
  Rust runtime keeps the item contract for it (src/worker.rs): calling each form, retries
  with back-off, discarding a failed attempt's emits, per-item ``on_error``, stats, a
  stop check between items.
* **Elsewhere** (spawn_fork, fork_ipc, interpreters, spawn_interpreter, ray, spawn_ray,
  async): the work is a worker in ``"chunk"`` mode. Starting it starts a worker where the
  items run (a process, a subinterpreter, a Ray actor, an event loop); calling it with a
  chunk of items delivers them, streams back what they emit (``context.emit``), and
  returns the chunk's outcome: ``(retries, [(item, exception), ...])`` for the items that
  failed after their retries, optionally with each item's latency. Closing it stops the
  worker. The far side keeps the item contract in one place, :mod:`minigun.worker_loop`
  for processes, subinterpreters and Ray, :mod:`minigun.aio` for coroutines.

A combination an executor cannot honour is refused when the stage is defined (see
``Stage`` and ``FunctionStage`` in :mod:`minigun.stage`), never at run time.
"""

# No ``from __future__ import annotations`` here: the fields of this module's typed records
# reach ``typing`` as types rather than as strings, each of which it would compile when the
# class is made (20 to 70 µs a field, paid by every ``import minigun``).

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, NamedTuple, Protocol, TypeVar

from .callables import direct_call
from .graph import Graph, Node
from .plan import StagePlan

if TYPE_CHECKING:
    import weakref
else:
    from .lazy_import import weakref

#: What one worker calls per item (per batch for an accumulator; once for a producer).
Call = Callable[..., Any]
#: What a worker calls when it retires (a custom Stage's ``close``), if anything.
Close = Callable[[], Any] | None
#: Starts one worker: opens it (a custom Stage's copy runs ``open()``) and returns its
#: per-item call (None for a body-less accumulator, which only batches) and its close.
Start = Callable[[], tuple[Call | None, Close]]
#: How the runtime calls the work: per item ("value", "iterate") or per chunk ("chunk").
WorkMode = Literal["value", "iterate", "chunk"]


class StageCode(NamedTuple):
    """A stage's code before an executor places it: a function (``call``, bound to its
    Task) or a custom Stage (``start`` opens one worker's copy)."""

    call: Call | None = None
    start: Start | None = None

    def starter(self) -> Start:
        """Start a worker of either form: a function's worker opens nothing."""
        if self.start is not None:
            return self.start
        call = self.call

        def start_function() -> tuple[Call | None, Close]:
            return call, None

        return start_function


class Work(NamedTuple):
    """What the runtime's worker threads run for one stage."""

    #: Called per item by every worker thread; None when each worker gets its own from
    #: ``make_worker``.
    call: Call | None
    mode: WorkMode
    #: Starts one worker thread's worker (see :data:`Start`).
    make_worker: Start | None
    #: The runtime's worker threads for the stage (with ``per_item``: at most this many
    #: at once).
    threads: int
    #: A new worker thread per input item (``spawn_thread``).
    per_item: bool = False
    #: The fewest items a chunk for the stage carries when that many are waiting.
    min_chunk: int = 1


class Run(Protocol):
    """What an executor may ask of the run it works for (``minigun.run.Run``)."""

    @property
    def stopping(self) -> bool:
        """True once the run was cancelled or failed."""

    @property
    def graph(self) -> Graph:
        """The run's compiled graph."""

    @property
    def plans(self) -> Mapping[str, StagePlan]:
        """Every stage's plan, by path."""

    def input_waiting(self, node: Node) -> bool:
        """Whether items wait in ``node``'s input queue now."""


class Executor(Protocol):
    """A strategy: turns a stage's code into the runtime's work for it."""

    def __call__(self, run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work: ...


def in_process(run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work:
    """inline, threads and spawn_thread: the runtime's threads call the stage itself."""
    return Work(
        call=None if code.call is None else direct_call(code.call),
        mode=plan.call_mode,
        make_worker=code.start,
        threads=plan.workers,
        per_item=plan.strategy == "spawn_thread",
        min_chunk=plan.min_chunk,
    )


State = TypeVar("State")


class PerRun(Generic[State]):
    """What an executor keeps for each run it works for (a process budget, a Ray
    connection): made by ``make(run)`` at first use, dropped with the run. With
    ``finish``, :func:`finish_run` hands the run's state to it once the run's worker
    threads are joined (idle forked children to end, a Ray session to close)."""

    #: Every PerRun made with a ``finish``: what :func:`finish_run` asks.
    _finishing: "ClassVar[list[PerRun[Any]]]" = []

    def __init__(
        self, make: Callable[[Any], State], finish: Callable[[State], None] | None = None
    ) -> None:
        self._make = make
        self._finish = finish
        self._lock = threading.Lock()
        self._states: weakref.WeakKeyDictionary[Any, State] = weakref.WeakKeyDictionary()
        if finish is not None:
            PerRun._finishing.append(self)

    def of(self, run: Any) -> State:
        with self._lock:
            state = self._states.get(run)
            if state is None:
                state = self._states[run] = self._make(run)
            return state

    def every(self) -> list[State]:
        with self._lock:
            return list(self._states.values())

    def finish(self, run: Any) -> None:
        """Forget the run's state, after handing it to ``finish`` (if it had one)."""
        with self._lock:
            state = self._states.pop(run, None)
        if state is not None and self._finish is not None:
            self._finish(state)


def finish_run(run: Any) -> None:
    """Release what the executors kept for ``run`` once its worker threads are joined.
    Only the executors the process has loaded can have kept anything."""
    for per_run in PerRun._finishing:
        per_run.finish(run)
