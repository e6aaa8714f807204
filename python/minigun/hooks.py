"""Hooks: user functions run around a run, a stage, each fork, and on errors.

In the class DSL the decorators only mark methods; the Task collects the marks when the
class is created (base classes first). In the builder the Pipeline's methods of the same
names register plain functions. Both end up as :class:`Hook` records in a :class:`HookSet`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import DefinitionError

F = TypeVar("F", bound=Callable[..., Any])

BEFORE_RUN = "before_run"
AFTER_RUN = "after_run"
BEFORE_FORK = "before_fork"
AFTER_FORK = "after_fork"
BEFORE = "before"
AFTER = "after"
ON_ERROR = "on_error"

MARK = "__minigun_hooks__"


@dataclass(frozen=True)
class Hook:
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

    def of(self, kind: str, stage: str | None = None) -> list[Hook]:
        return [h for h in self._hooks if h.kind == kind and h.stage == stage]

    def all(self) -> list[Hook]:
        return list(self._hooks)

    def copy(self) -> HookSet:
        clone = HookSet()
        clone._hooks = list(self._hooks)
        return clone


def _mark(fn: F, kind: str, stage: str | None, errors: tuple, prepend: bool) -> F:
    if not callable(fn):
        raise DefinitionError(f"@{kind} decorates a function, got {fn!r}")
    marks = list(getattr(fn, MARK, ()))
    marks.append((kind, stage, errors, prepend))
    try:
        setattr(fn, MARK, marks)
    except AttributeError:
        raise DefinitionError(f"@{kind} cannot decorate {fn!r}") from None
    return fn


def _plain(kind: str):
    def decorator(fn: Any = None, *, prepend: bool = False) -> Any:
        if fn is None:
            return lambda f: _mark(f, kind, None, (), prepend)
        return _mark(fn, kind, None, (), prepend)

    decorator.__name__ = kind
    decorator.__doc__ = f"Mark a Task method as a ``{kind}`` hook (bare or ``prepend=True``)."
    return decorator


def _stage_scoped(kind: str, *, required: bool):
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


before_run = _plain(BEFORE_RUN)
after_run = _plain(AFTER_RUN)
before_fork = _stage_scoped(BEFORE_FORK, required=False)
after_fork = _stage_scoped(AFTER_FORK, required=False)
before = _stage_scoped(BEFORE, required=True)
after = _stage_scoped(AFTER, required=True)


def error_types(types: tuple[Any, ...]) -> tuple[type[BaseException], ...]:
    if not types:
        return (Exception,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise DefinitionError(f"@on_error takes exception types, got {t!r}")
    return tuple(types)


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
