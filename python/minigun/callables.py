"""A user's callable as minigun sees it: the function a call of it runs, and the cheapest
way to make that call.

A stage may be any callable: a function, a bound method, a ``functools.partial``, or an
object of a class that defines ``__call__`` (a stateful stage). ``stage(x)`` runs
``type(stage).__call__(stage, x)`` for the latter, so that method's kind (a generator
function, a coroutine function, an async generator function) is the stage's form, as it
is for a function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import FunctionType, MethodType
from typing import Any

#: The code flags that make a call of a function a coroutine or an async generator.
ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


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
    """The code flags of ``fn`` where it is a plain function that nothing wraps or marks
    (its ``__dict__`` is empty: no ``__wrapped__``, no coroutine mark), else None.

    For such a function they say all that ``inspect.isgeneratorfunction``,
    ``iscoroutinefunction`` and ``isasyncgenfunction`` would, after unwrapping it and
    looking for a ``__call__``, in a tenth of the time: a pipeline built per call asks
    for each of its stages."""
    if type(fn) is FunctionType and not fn.__dict__:
        return fn.__code__.co_flags
    return None
