"""A user's callable as minigun sees it: the function a call of it runs, and the cheapest
way to make that call.

A stage may be any callable: a function, a bound method, a ``functools.partial``, or an
object of a class that defines ``__call__`` (a stateful stage). ``stage(x)`` runs
``type(stage).__call__(stage, x)`` for the latter, so that method's kind (a generator
function, a coroutine function, an async generator function) is the stage's form, as it
is for a function.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FunctionType, MethodType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import inspect
else:
    from .lazy_import import inspect

#: Code flags (``co_flags`` bits, as the ``inspect`` module names them; CPython has kept
#: their values since 3.6), spelled out so that reading a plain function's form imports
#: nothing: ``inspect`` and what it loads are a fifth of ``import minigun`` on 3.11.
CO_VARARGS = 0x0004
CO_GENERATOR = 0x0020
CO_COROUTINE = 0x0080
CO_ASYNC_GENERATOR = 0x0200
#: The code flags that make a call of a function a coroutine or an async generator.
_ASYNC_FLAGS = CO_COROUTINE | CO_ASYNC_GENERATOR


def _class_call(fn: object) -> FunctionType | None:
    """``type(fn).__call__`` where the class defines it as a Python function, else None
    (a function, a builtin, a partial, a class: their type's ``__call__`` is a slot)."""
    for klass in type(fn).__mro__:
        if "__call__" in vars(klass):
            dunder = vars(klass)["__call__"]
            return dunder if isinstance(dunder, FunctionType) else None
    return None


def called_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What ``fn(...)`` runs: its class's ``__call__`` for a callable object, else ``fn``."""
    return _class_call(fn) or fn


def direct_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, made cheaper to call per item where that changes nothing else.

    CPython (3.11 to 3.13) calls an object of a Python class that defines ``__call__`` by
    building a tuple of the arguments on every call; the same ``__call__`` bound to the
    object takes the vectorcall path, with no tuple. Both run
    ``type(fn).__call__(fn, ...)``: an instance attribute named ``__call__`` is ignored
    either way. Anything else is returned as it is."""
    dunder = _class_call(fn)
    return fn if dunder is None else MethodType(dunder, fn)


def plain_code_flags(fn: object) -> int | None:
    """The code flags of ``fn`` where it is a plain function, or a method bound to one,
    that nothing wraps or marks (its ``__dict__`` is empty: no ``__wrapped__``, no
    coroutine mark), else None.

    For such a function they say all that ``inspect.isgeneratorfunction``,
    ``iscoroutinefunction`` and ``isasyncgenfunction`` would, in a tenth of the time and
    without importing ``inspect``: a pipeline built per call asks for each of its stages."""
    if type(fn) is MethodType:
        fn = fn.__func__
    if type(fn) is FunctionType and not fn.__dict__:
        return fn.__code__.co_flags
    return None


def unwrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function at the end of ``fn``'s ``__wrapped__`` chain (``functools.wraps``), as
    ``inspect.unwrap`` finds it; ``fn`` itself when nothing wraps it."""
    return inspect.unwrap(fn) if hasattr(fn, "__wrapped__") else fn


def is_generator_function(fn: object) -> bool:
    """Whether a call of ``fn`` makes a generator (``inspect.isgeneratorfunction``)."""
    flags = plain_code_flags(fn)
    if flags is not None:
        return bool(flags & CO_GENERATOR)
    return inspect.isgeneratorfunction(fn)


def is_async_function(fn: object) -> bool:
    """Whether a call of ``fn`` makes a coroutine or an async generator."""
    flags = plain_code_flags(fn)
    if flags is not None:
        return bool(flags & _ASYNC_FLAGS)
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def is_async_generator_function(fn: object) -> bool:
    """Whether a call of ``fn`` makes an async generator (``inspect.isasyncgenfunction``)."""
    flags = plain_code_flags(fn)
    if flags is not None:
        return bool(flags & CO_ASYNC_GENERATOR)
    return inspect.isasyncgenfunction(fn)


def runs_async(fn: Callable[..., Any] | None) -> bool:
    """Whether what a call of ``fn`` runs (through ``functools.wraps`` chains and a
    class's ``__call__``) is ``async``: a coroutine or an async generator function."""
    return fn is not None and is_async_function(called_function(unwrapped(fn)))
