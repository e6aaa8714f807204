"""The Rust runtime as the package reaches it: the one module that imports the extension
``minigun._minigun``; every other module takes ``ext`` from here.

A subinterpreter cannot load the extension (PyO3 modules refuse them), yet ``import
minigun`` and defining a Task must work there: a subinterpreter worker unpickles the Task
and imports the stage's module. There ``ext`` is a stand-in whose every attribute raises
:class:`~minigun.errors.MinigunError`, and nothing on a worker's path reaches for it:
``mg.emit`` goes to the worker's own emitter (``context.set_child_emitter``) and the item
contract there is :mod:`minigun.worker_loop`, which never uses the runtime.
"""

# No ``from __future__ import annotations`` here: the fields of this module's typed records
# reach ``typing`` as types rather than as strings, each of which it would compile when the
# class is made (20 to 70 µs a field, paid by every ``import minigun``).

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypedDict

from .errors import MinigunError

try:  # CPython 3.13+: tells a subinterpreter from the main one
    import _interpreters  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # older Pythons have no subinterpreters to run in
    _interpreters = None


def in_subinterpreter() -> bool:
    """True when this code runs in a subinterpreter rather than the main interpreter."""
    if _interpreters is None:
        return False
    return bool(_interpreters.get_current()[0] != _interpreters.get_main()[0])


class _NoRuntime:
    """Stands in for the extension in a subinterpreter. Modules may look its functions up
    when they are imported (``context`` binds ``ext.emit``); calling one says why it
    cannot work."""

    def __getattr__(self, name: str) -> Callable[..., NoReturn]:
        def unavailable(*args: object, **kwargs: object) -> NoReturn:
            raise MinigunError(
                f"minigun's Rust runtime ({name}) is not available in a subinterpreter: "
                "a subinterpreter worker runs stage code only; start runs from the main "
                "interpreter"
            )

        return unavailable


#: The runtime's stage kinds: nested pipelines are flattened away before it sees them, and
#: consumers are processors with no downstream.
RuntimeKind = Literal["producer", "processor", "accumulator"]


class StageSpec(TypedDict):
    """One stage as the runtime takes it (``Runtime(specs)``; src/scheduler.rs reads the
    same fields into its ``StageSpec``). A bad value is refused there with a
    :class:`~minigun.errors.DefinitionError` naming the stage and the field."""

    name: str
    kind: RuntimeKind
    #: Called per item (per batch for accumulators; once for producers), or None.
    call: Callable[..., Any] | None
    #: "value": emit the return value unless None; "iterate": emit each element; "chunk":
    #: the call takes a list of items, emits through ``emit()`` itself and returns the
    #: chunk's outcome (see minigun.work).
    mode: Literal["value", "iterate", "chunk"]
    #: Starts one worker: ``() -> (call, close)``.
    make_worker: Callable[[], tuple[Callable[..., Any] | None, Callable[[], Any] | None]] | None
    workers: int
    spawn_per_item: bool
    #: The ``inline`` strategy: the stage runs on the thread of the one stage feeding it
    #: where that stage has one runtime thread (src/inline.rs), else on a thread of its own.
    inline: bool
    queue_size: int | None
    min_chunk: int
    downstream: list[int]
    routing: Literal["broadcast", "round_robin"]
    route_names: dict[str, list[int]]
    route_error: Callable[[str], BaseException]
    retries: int
    retry_on: tuple[type[BaseException], ...]
    retry_backoff: float
    on_failure: Callable[[BaseException, Any, str], bool]
    on_finish: Callable[[], None] | None
    auto_start: bool
    max_size: int
    max_all: int
    check_interval: int
    max_wait: float | None
    key: Callable[[Any], Any] | None


if TYPE_CHECKING or not in_subinterpreter():
    from . import _minigun as ext
else:
    ext: Any = _NoRuntime()

__all__ = ["StageSpec", "ext", "in_subinterpreter"]
