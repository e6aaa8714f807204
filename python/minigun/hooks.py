"""Hooks: user functions run around a run, a stage, each worker, each fork, and on errors.

In the class DSL the decorators only mark methods; the Task collects the marks when the
class is created (base classes first). In the builder the Pipeline's methods of the same
names register plain functions. Both end up as :class:`Hook` records in a :class:`HookSet`.
"""

# No ``from __future__ import annotations`` here: the fields of this module's typed records
# reach ``typing`` as types rather than as strings, each of which it would compile when the
# class is made (20 to 70 µs a field, paid by every ``import minigun``).

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar, cast, overload

from .errors import DefinitionError

F = TypeVar("F", bound=Callable[..., Any])

BEFORE_RUN = "before_run"
AFTER_RUN = "after_run"
BEFORE_FORK = "before_fork"
AFTER_FORK = "after_fork"
BEFORE = "before"
AFTER = "after"
ON_ERROR = "on_error"
BEFORE_WORKER = "before_worker"
AFTER_WORKER = "after_worker"

MARK = "__minigun_hooks__"


class Hook(NamedTuple):
    kind: str
    fn: Callable[..., Any]
    stage: str | None = None
    errors: tuple[type[BaseException], ...] = (Exception,)
    prepend: bool = False
    #: The Task attribute the hook came from (so a subclass can override it), if any.
    attr: str | None = None

    def matches_error(self, error: BaseException, stage: str, local: str) -> bool:
        if not isinstance(error, self.errors):
            return False
        return self.stage is None or self.stage in (stage, local)


class HookSet:
    """Hooks in the order they run: definition order, ``prepend=True`` ones first."""

    def __init__(self, hooks: list[Hook] | None = None) -> None:
        self._hooks: list[Hook] = []
        for hook in hooks or []:
            self.add(hook)

    def add(self, hook: Hook) -> None:
        if hook.attr is not None:
            # A subclass redefining a hook method replaces the base's hook in place.
            for i, old in enumerate(self._hooks):
                if old.attr == hook.attr and old.kind == hook.kind and old.stage == hook.stage:
                    self._hooks[i] = hook
                    return
        if hook.prepend:
            self._hooks.insert(0, hook)
        else:
            self._hooks.append(hook)

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def of(self, kind: str, stage: str | None = None) -> list[Hook]:
        return [h for h in self._hooks if h.kind == kind and h.stage == stage]

    def all(self) -> list[Hook]:
        return list(self._hooks)

    def copy(self) -> "HookSet":
        clone = HookSet()
        clone._hooks = list(self._hooks)
        return clone


def _mark(
    fn: F, kind: str, stage: str | None, errors: tuple[type[BaseException], ...], prepend: bool
) -> F:
    if not callable(fn):
        raise DefinitionError(f"@{kind} decorates a function, got {fn!r}")
    marks = list(getattr(fn, MARK, ()))
    marks.append((kind, stage, errors, prepend))
    try:
        setattr(fn, MARK, marks)
    except AttributeError:
        raise DefinitionError(f"@{kind} cannot decorate {fn!r}") from None
    return fn


def _plain(kind: str) -> Callable[..., Any]:
    def decorator(fn: Any = None, *, prepend: bool = False) -> Any:
        if fn is None:
            return lambda f: _mark(f, kind, None, (), prepend)
        return _mark(fn, kind, None, (), prepend)

    decorator.__name__ = kind
    decorator.__doc__ = f"Mark a Task method as a ``{kind}`` hook (bare or ``prepend=True``)."
    return decorator


def _stage_scoped(kind: str, *, required: bool) -> Callable[..., Any]:
    def decorator(stage: Any = None, *, prepend: bool = False) -> Any:
        if callable(stage) and not isinstance(stage, str):
            if required:
                raise DefinitionError(f"@{kind} needs a stage name: @mg.{kind}('stage')")
            return _mark(stage, kind, None, (), prepend)
        if stage is not None and not isinstance(stage, str):
            raise DefinitionError(f"@{kind}: the stage must be named by a str, got {stage!r}")
        if required and stage is None:
            raise DefinitionError(f"@{kind} needs a stage name: @mg.{kind}('stage')")
        return lambda f: _mark(f, kind, stage, (), prepend)

    decorator.__name__ = kind
    return decorator


# The decorators' types, so a decorated method keeps its own type for type checkers.


class PlainHookDecorator(Protocol):
    """``@mg.before_run`` / ``@mg.before_run(prepend=True)``."""

    @overload
    def __call__(self, fn: F, /) -> F: ...
    @overload
    def __call__(self, fn: None = None, /, *, prepend: bool = False) -> Callable[[F], F]: ...


class ForkHookDecorator(Protocol):
    """``@mg.before_fork`` / ``@mg.before_fork("stage")``."""

    @overload
    def __call__(self, stage: F, /) -> F: ...
    @overload
    def __call__(
        self, stage: str | None = None, /, *, prepend: bool = False
    ) -> Callable[[F], F]: ...


class StageHookDecorator(Protocol):
    """``@mg.before("stage")``."""

    def __call__(self, stage: str, /, *, prepend: bool = False) -> Callable[[F], F]: ...


class WorkerHookDecorator(Protocol):
    """``@mg.before_worker`` / ``@mg.before_worker(stage="save")``."""

    @overload
    def __call__(self, fn: F, /) -> F: ...
    @overload
    def __call__(
        self,
        fn: str | Sequence[str] | None = None,
        /,
        *,
        stage: str | Sequence[str] | None = None,
        prepend: bool = False,
    ) -> Callable[[F], F]: ...


before_run = cast(PlainHookDecorator, _plain(BEFORE_RUN))
after_run = cast(PlainHookDecorator, _plain(AFTER_RUN))
before_fork = cast(ForkHookDecorator, _stage_scoped(BEFORE_FORK, required=False))
after_fork = cast(ForkHookDecorator, _stage_scoped(AFTER_FORK, required=False))
before = cast(StageHookDecorator, _stage_scoped(BEFORE, required=True))
after = cast(StageHookDecorator, _stage_scoped(AFTER, required=True))


def _worker_scoped(kind: str) -> Callable[..., Any]:
    def decorator(
        fn: Any = None,
        /,
        *,
        stage: str | list[str] | tuple[str, ...] | None = None,
        prepend: bool = False,
    ) -> Any:
        if isinstance(fn, (str, list, tuple)):
            fn, stage = None, fn  # @mg.before_worker("save") reads naturally too
        names = stage_names(kind, stage)
        if fn is None:
            return lambda f: _mark_each(f, kind, names, prepend)
        return _mark_each(fn, kind, names, prepend)

    decorator.__name__ = kind
    when = "before its first" if kind == BEFORE_WORKER else "after its last"
    decorator.__doc__ = (
        f"Mark a Task method ``hook(self)`` to run in every worker of the pipeline (or of the "
        f"stages named by ``stage=``), {when} item, on the worker's own thread and in its "
        "own process."
    )
    return decorator


def stage_names(kind: str, stage: Any) -> tuple[str | None, ...]:
    """``stage=`` of a worker hook as a tuple of names; ``(None,)`` means every stage."""
    if stage is None:
        return (None,)
    names = (stage,) if isinstance(stage, str) else tuple(stage)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DefinitionError(
            f"@{kind}: stage= takes a stage name or a list of names, got {stage!r}"
        )
    return names


def _mark_each(fn: F, kind: str, names: tuple[str | None, ...], prepend: bool) -> F:
    for name in names:
        _mark(fn, kind, name, (), prepend)
    return fn


before_worker = cast(WorkerHookDecorator, _worker_scoped(BEFORE_WORKER))
after_worker = cast(WorkerHookDecorator, _worker_scoped(AFTER_WORKER))


def for_node(node: Any, kind: str) -> list[Callable[..., Any]]:
    """The hooks of ``kind`` that apply to one stage of a compiled graph, bound, in the
    order they run: pipeline-wide hooks of every enclosing pipeline (outermost first),
    then those scoped to the stage or to a nested pipeline containing it."""
    lineage = node.scope.lineage()[::-1]
    if not any(scope.hooks for scope in lineage):
        return []  # the common case, checked for every stage of every run
    wide = [s.bind(h) for s in lineage for h in s.hooks.of(kind)]
    scoped = []
    for scope in lineage:
        relative = node.path[len(scope.path) + 1 :] if scope.path else node.path
        names = {relative, relative.split(".", 1)[0]}
        scoped += [
            scope.bind(h)
            for h in scope.hooks.all()
            if h.kind == kind and h.stage is not None and h.stage in names
        ]
    return wide + scoped


class WorkerHooks:
    """The ``before_worker`` and ``after_worker`` hooks of one stage, and the wrappers that
    run them in the stage's workers."""

    def __init__(self, node: Any) -> None:
        self.before = for_node(node, BEFORE_WORKER)
        self.after = for_node(node, AFTER_WORKER)

    def __bool__(self) -> bool:
        return bool(self.before or self.after)

    def begin(self) -> None:
        for hook in self.before:
            hook()

    def end(self) -> None:
        for hook in self.after:
            hook()

    def around_worker(
        self, make_worker: Callable[[], tuple[Any, Any]]
    ) -> Callable[[], tuple[Any, Any]]:
        """A long-lived worker: the hooks run when it opens and when it closes."""

        def make() -> tuple[Any, Any]:
            self.begin()
            call, close = make_worker()

            def close_all() -> None:
                try:
                    if close is not None:
                        close()
                finally:
                    self.end()

            return call, close_all

        return make

    def around_item(self, call: Callable[[Any], Any], iterate: bool) -> Callable[[Any], Any]:
        """A worker per item (spawn_thread, spawn_fork): the hooks run around the call, in
        the thread or child that runs it."""
        if iterate:

            def each_generating(item: Any) -> Any:
                self.begin()
                try:
                    result = call(item)
                    if result is not None:
                        yield from result
                finally:
                    self.end()

            return each_generating

        def each(item: Any) -> Any:
            self.begin()
            try:
                return call(item)
            finally:
                self.end()

        return each


def error_types(types: tuple[Any, ...]) -> tuple[type[BaseException], ...]:
    if not types:
        return (Exception,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise DefinitionError(f"@on_error takes exception types, got {t!r}")
    return tuple(types)


@overload
def on_error(fn: F, /) -> F: ...  # type: ignore[overload-overlap,unused-ignore]
@overload
def on_error(
    *types: type[BaseException], stage: str | None = None, prepend: bool = False
) -> Callable[[F], F]: ...
def on_error(*types: Any, stage: str | None = None, prepend: bool = False) -> Any:
    """Mark a Task method ``handler(self, error, item, stage)`` as the handler of items
    whose processing failed with one of ``types`` (after retries)."""
    if len(types) == 1 and callable(types[0]) and not isinstance(types[0], type):
        return _mark(types[0], ON_ERROR, None, (Exception,), prepend)
    errors = error_types(types)
    return lambda f: _mark(f, ON_ERROR, stage, errors, prepend)


def collect(namespace: dict[str, Any]) -> list[Hook]:
    """The hooks marked on the functions of a class body, in definition order."""
    found = []
    for attr, value in namespace.items():
        fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        for kind, stage, errors, prepend in getattr(fn, MARK, ()):
            found.append(Hook(kind, fn, stage, errors or (Exception,), prepend, attr))
    return found
