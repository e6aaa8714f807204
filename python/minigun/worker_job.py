"""What a worker in another interpreter or on Ray is given: one stage's code as plain,
picklable data.

A subinterpreter (or a Ray actor) shares no objects with the parent, so a stage's code
reaches it pickled, and pickle copies functions and classes *by qualified name*: the worker
imports them. So a :class:`WorkerJob` holds the parts of a stage (its function or custom Stage, the
Task instance it belongs to, its worker hooks, its retry policy and routes), not the
closures the in-process strategies call, and the worker puts them together
(:meth:`WorkerJob.start`).

`job_of` makes a stage's job. `pack_by_name` pickles it in the parent, when the run is
built (for a subinterpreter), and turns everything that cannot travel (a lambda, a
closure, a class defined inside a function, a Task attribute that cannot be pickled) into
a ``DefinitionError`` that says what to change, before anything runs. (Ray pickles the job
with cloudpickle instead, which copies by value what it cannot import.) This module must
never import the extension: the worker unpickles the job inside the subinterpreter.
"""

from __future__ import annotations

import importlib
import io
import pickle
import types
from collections.abc import Callable
from typing import Any, NamedTuple

from .config import RetryPolicy
from .errors import DefinitionError
from .graph import Node
from .hooks import WorkerHooks
from .plan import StagePlan
from .stage import FunctionStage, Stage, worker_copy

PROTOCOL = pickle.HIGHEST_PROTOCOL

Call = Callable[[Any], Any]
Close = Callable[[], Any] | None


class WorkerJob(NamedTuple):
    """One stage's code, as a subinterpreter worker rebuilds it."""

    path: str
    #: How the stage's results are emitted: "value" or "iterate" (``StagePlan.call_mode``).
    mode: str
    routes: frozenset[str]
    route_error: Callable[[str], BaseException]
    policy: RetryPolicy
    #: A function stage's function (unbound) and the Task instance it is a method of.
    function: Callable[..., Any] | None = None
    owner: Any = None
    #: A custom Stage, the prototype each worker copies and opens.
    stage: Stage | None = None
    hooks: WorkerHooks | None = None

    def start(self) -> tuple[Call, Close]:
        """Open this worker: its before_worker hooks, then its copy of a custom Stage (or
        the function, bound to this worker's copy of the Task). Its close runs the custom
        Stage's ``close()``, then the after_worker hooks."""
        if self.hooks is not None:
            opened: tuple[Call, Close] = self.hooks.around_worker(self._open)()
            return opened
        return self._open()

    def _open(self) -> tuple[Call, Close]:
        if self.stage is not None:
            worker = worker_copy(self.stage)
            worker.open()
            return worker.process, worker.close
        if self.function is None:
            raise ValueError(f"stage {self.path!r}: a job with neither a function nor a Stage")
        if self.owner is None:
            return self.function, None
        bound: Call = types.MethodType(self.function, self.owner)
        return bound, None


def stage_function(module: str, qualname: str) -> Callable[..., Any]:
    """The function of the stage at ``module.qualname`` (a Task method: the class
    attribute is the Stage that wraps it)."""
    found = _resolve(module, qualname)
    if isinstance(found, FunctionStage) and found.fn is not None:
        return found.fn
    function: Callable[..., Any] = found
    return function


def _resolve(module: str, qualname: str) -> Any:
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _defined_at(obj: Any) -> tuple[str, str]:
    return getattr(obj, "__module__", None) or "?", getattr(obj, "__qualname__", "?")


class _JobPickler(pickle.Pickler):
    """Pickles a job, refusing what a fresh interpreter could not import, and copying a
    Task method by the name of the stage that wraps it."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType) or isinstance(obj, type):
            module, qualname = _defined_at(obj)
            if "<lambda>" in qualname or "<locals>" in qualname:
                what = "a lambda" if "<lambda>" in qualname else "defined inside a function"
                raise _Unimportable(f"{module}.{qualname} is {what}")
            if isinstance(obj, types.FunctionType) and _wrapped_by_stage(obj, module, qualname):
                return stage_function, (module, qualname)
        return NotImplemented


class _Unimportable(Exception):
    """Something a subinterpreter would have to import by name, but cannot."""


def _wrapped_by_stage(function: types.FunctionType, module: str, qualname: str) -> bool:
    """Whether ``module.qualname`` names a Stage whose function this is (a Task method,
    which pickle cannot find by name: the class attribute is the Stage)."""
    try:
        found = _resolve(module, qualname)
    except Exception:  # noqa: BLE001 - not found by name: pickle says why
        return False
    return isinstance(found, FunctionStage) and found.fn is function


def job_of(node: Node, plan: StagePlan, route_error: Callable[[str], BaseException]) -> WorkerJob:
    """The job of the stage of ``node`` (``route_error``: what its ``emit(to=)`` raises for
    a stage it may not send to)."""
    stage, settings = node.stage, node.scope.settings
    hooks = WorkerHooks(node)
    function = owner = custom = None
    if isinstance(stage, FunctionStage):
        function = stage.fn
        owner = node.scope.owner if stage.takes_self else None
    else:
        custom = stage
    return WorkerJob(
        path=node.path,
        mode=plan.call_mode,
        routes=frozenset(node.route_names),
        route_error=route_error,
        policy=RetryPolicy(stage, settings),
        function=function,
        owner=owner,
        stage=custom,
        hooks=hooks if hooks else None,
    )


def pack_by_name(job: WorkerJob) -> bytes:
    """The pickled job; DefinitionError naming the stage and the fix when part of it
    cannot reach a subinterpreter."""
    buffer = io.BytesIO()
    try:
        _JobPickler(buffer, PROTOCOL).dump(job)
    except Exception as exc:  # noqa: BLE001 - every cause gets the same advice
        cause = str(exc) if isinstance(exc, _Unimportable) else f"{type(exc).__name__}: {exc}"
        raise DefinitionError(
            f"stage {job.path!r} runs in subinterpreters, which get its code by pickling "
            f"and import its functions and classes by qualified name, but {cause}. Define "
            "the stage's function, its custom Stage class and its Task class at module "
            "level (no lambda, closure or class inside a function), make the Task's "
            "attributes picklable (or give it __getstate__ to leave parent-only state "
            "out), or use strategy='fork_ipc', whose workers get a copy of the process"
        ) from exc
    return buffer.getvalue()
