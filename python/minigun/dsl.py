"""The class DSL: ``mg.Task`` and the stage decorators (API.md section 1).

The decorators turn methods into :class:`~minigun.stage.FunctionStage` objects; the Task
collects them in definition order when the class is created (base classes' stages first,
a redefined method replacing its base stage in place) and builds one
:class:`~minigun.pipeline.Pipeline` per class from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, Unpack, overload

from . import config as _config
from . import hooks as _hooks
from .context import emit as _emit
from .context import trigger as _trigger
from .errors import DefinitionError
from .graph import compile_graph
from .kinds import ACCUMULATOR, PROCESSOR, PRODUCER
from .pipeline import Pipeline
from .run import Run
from .stage import (
    AccumulatorOptions,
    FunctionStage,
    NestedStage,
    Stage,
    StageOptions,
)
from .stats import RunResult

if TYPE_CHECKING:
    from . import mermaid
else:
    from .lazy_import import ImportedOnFirstUse

    mermaid = ImportedOnFirstUse("minigun.mermaid")  # loaded by the first to_mermaid()

F = TypeVar("F", bound=Callable[..., Any])


def _stage_decorator(kind: str, fn: F | None, options: StageOptions) -> Any:
    if fn is None:
        return lambda f: FunctionStage(kind, f, takes_self=True, **options)
    return FunctionStage(kind, fn, takes_self=True, **options)


# Each decorator keeps the function's type for type checkers (the Stage it makes behaves as
# the method on instances) and spells out its options (StageOptions) for IDEs.


@overload
def producer(fn: F, /) -> F: ...
@overload
def producer(fn: None = None, /, **options: Unpack[StageOptions]) -> Callable[[F], F]: ...
def producer(fn: F | None = None, /, **options: Unpack[StageOptions]) -> Any:
    """A stage that makes items: ``def users(self): yield ...`` (or returns an iterable)."""
    return _stage_decorator(PRODUCER, fn, options)


@overload
def processor(fn: F, /) -> F: ...
@overload
def processor(fn: None = None, /, **options: Unpack[StageOptions]) -> Callable[[F], F]: ...
def processor(fn: F | None = None, /, **options: Unpack[StageOptions]) -> Any:
    """A stage that handles one item; a non-None return value is emitted."""
    return _stage_decorator(PROCESSOR, fn, options)


@overload
def consumer(fn: F, /) -> F: ...
@overload
def consumer(fn: None = None, /, **options: Unpack[StageOptions]) -> Callable[[F], F]: ...
def consumer(fn: F | None = None, /, **options: Unpack[StageOptions]) -> Any:
    """The same as ``processor``; the name says the stage ends a branch."""
    return _stage_decorator(PROCESSOR, fn, options)


class BatchStage(Protocol):
    """What ``mg.accumulator(...)`` returns without a function: a body-less accumulator
    (a class attribute emitting each batch) that also decorates a method to give it a body."""

    def __call__(self, fn: F, /) -> F: ...


@overload
def accumulator(fn: F, /) -> F: ...
@overload
def accumulator(fn: str | None = None, /, **options: Unpack[AccumulatorOptions]) -> BatchStage: ...
def accumulator(fn: Any = None, /, **options: Any) -> Any:
    """A stage that collects items into lists of up to ``max_size`` (per ``key=``).

    ``@mg.accumulator(max_size=500)`` above a method gives the batch to the method;
    ``batch = mg.accumulator("batch", max_size=500)`` as a class attribute emits each batch.
    """
    if isinstance(fn, str):
        options["name"] = fn
        fn = None
    if fn is not None:
        return FunctionStage(ACCUMULATOR, fn, takes_self=True, **options)
    try:
        stage = FunctionStage(ACCUMULATOR, None, takes_self=True, **options)
    except DefinitionError:
        if options.get("name") is not None:
            raise
        # The stage's name is not known yet: the error names it once it is.
        return _MisdefinedAccumulator(options)
    if options.get("name") is None:
        stage.name_after_body()
    return stage


class _MisdefinedAccumulator:
    """What ``@mg.accumulator(...)`` with wrong options returns before it knows its name:
    decorating a method (or becoming a class attribute) raises the error, naming the stage
    after the method (or the attribute)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def __call__(self, fn: Callable[..., Any]) -> NoReturn:
        FunctionStage(ACCUMULATOR, fn, takes_self=True, **self.options)
        raise AssertionError("unreachable: the options were rejected")  # pragma: no cover

    def raise_for(self, attr: str) -> NoReturn:
        FunctionStage(ACCUMULATOR, None, takes_self=True, name=attr, **self.options)
        raise AssertionError("unreachable: the options were rejected")  # pragma: no cover


def nested(target: Any, *, name: str | None = None, **options: Any) -> NestedStage:
    """Use another Task (class or instance) as one stage of this Task."""
    return NestedStage(target, name=name, **options)


class _HybridMethod:
    """A method that works on the class and on instances (``Task.to_mermaid()``)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, instance: Any, owner: type) -> Callable[..., Any]:
        bound: Callable[..., Any] = self.fn.__get__(owner if instance is None else instance, owner)
        return bound


class _ClassProperty:
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, instance: Any, owner: type) -> Any:
        return self.fn(owner)


def task_settings(cls: type, owner: Any) -> dict[str, Any]:
    """The settings a Task class (or its instance ``owner``) sets itself, as attributes."""
    found: dict[str, Any] = {}
    names = list(_config.DEFAULTS) + list(_config.ALIASES)
    for klass in reversed(cls.__mro__):
        if klass in (Task, object):
            continue
        for name in names:
            if name in klass.__dict__:
                found[_config.ALIASES.get(name, name)] = klass.__dict__[name]
    if owner is not None:
        for name in names:
            if name in getattr(owner, "__dict__", {}):
                found[_config.ALIASES.get(name, name)] = owner.__dict__[name]
    return _config.normalize(found, f"Task {cls.__name__}")


class Task:
    """Base class of a job defined with the class DSL::

    class Double(mg.Task):
        @mg.producer
        def numbers(self):
            yield from range(10)

        @mg.processor(threads=4)
        def double(self, n):
            return n * 2

    Double().run()
    """

    _minigun_members: dict[str, Stage] = {}
    _minigun_hooks: list[_hooks.Hook] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        members: dict[str, Stage] = {}
        hooks = _hooks.HookSet()
        for base in reversed(cls.__mro__[1:]):
            if isinstance(base, type) and issubclass(base, Task) and base is not Task:
                members.update(base.__dict__.get("_minigun_members", {}))
                for hook in base.__dict__.get("_minigun_hooks", []):
                    hooks.add(hook)
        for attr, value in list(cls.__dict__.items()):
            if isinstance(value, _MisdefinedAccumulator):
                value.raise_for(attr)
            if isinstance(value, Stage):
                if value.name is None:
                    value.name = attr
                members[attr] = value
            elif attr in members and callable(value):
                base_stage = members[attr]
                if not isinstance(base_stage, FunctionStage):
                    raise DefinitionError(
                        f"{cls.__name__}.{attr} replaces the {base_stage.kind} stage "
                        f"{base_stage.name!r} with a plain method; only function stages can "
                        "be overridden that way"
                    )
                overridden = base_stage.with_body(value)
                members[attr] = overridden
                setattr(cls, attr, overridden)
        for hook in _hooks.collect(dict(cls.__dict__)):
            hooks.add(hook)
        seen: dict[str | None, str] = {}
        for attr, stage in members.items():
            if stage.name in seen:
                raise DefinitionError(
                    f"{cls.__name__} has two stages named {stage.name!r} ({seen[stage.name]} "
                    f"and {attr}); give one of them another name= (two unnamed lambdas "
                    "collide: name them)"
                )
            seen[stage.name] = attr
        cls._minigun_members = members
        cls._minigun_hooks = hooks.all()
        _config.normalize(task_settings(cls, None), f"Task {cls.__name__}")

    @_ClassProperty
    def root_pipeline(cls: type[Task]) -> Pipeline:  # noqa: N805 - a class property
        """The :class:`Pipeline` this Task class builds."""
        cached = cls.__dict__.get("_minigun_pipeline")
        if cached is None:
            cached = Pipeline(cls.__name__)
            cached.stages = list(cls._minigun_members.values())
            cached.hooks = _hooks.HookSet(list(cls._minigun_hooks))
            cached.settings_of = lambda owner: task_settings(cls, owner)
            type.__setattr__(cls, "_minigun_pipeline", cached)
        return cached

    def run(self, **options: Any) -> RunResult:
        """Run the job to completion and return its :class:`RunResult`. Keyword options
        override the Task's limits for this run (``run(max_threads=8)``)."""
        return Run(type(self).root_pipeline, self, options).run()

    def start(self, **options: Any) -> Run:
        """Start the job in the background and return its :class:`Run`."""
        return Run(type(self).root_pipeline, self, options).start()

    def emit(self, value: Any, to: str | None = None) -> None:
        """Send ``value`` downstream from the running stage (to ``to`` only, if given)."""
        _emit(value, to)

    def trigger(self, name: str) -> None:
        """Start the ``auto_start=False`` producer called ``name``."""
        _trigger(name)

    @_HybridMethod
    def to_mermaid(self_or_cls) -> str:  # noqa: N805 - works on the class and instances
        """A Mermaid ``flowchart`` of the job's graph."""
        cls = self_or_cls if isinstance(self_or_cls, type) else type(self_or_cls)
        owner = None if isinstance(self_or_cls, type) else self_or_cls
        return mermaid.render(compile_graph(cls.root_pipeline, owner))
