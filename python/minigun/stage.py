"""Stages: the nodes of a pipeline.

Every stage is a :class:`Stage`: the ones the decorators make (:class:`FunctionStage`),
nested pipelines (:class:`NestedStage`) and custom subclasses that override
:meth:`Stage.process`.
"""

# No ``from __future__ import annotations`` here: the fields of this module's typed records
# reach ``typing`` as types rather than as strings, each of which it would compile when the
# class is made (20 to 70 µs a field, paid by every ``import minigun``).

import types
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypedDict, TypeVar

from . import strategies
from .callables import (
    CO_VARARGS,
    called_function,
    is_async_function,
    is_generator_function,
    unwrapped,
)
from .config import DEFAULT_QUEUE_SIZE, DEFAULT_RETRY_BACKOFF
from .context import emit as _emit
from .context import trigger as _trigger
from .errors import DefinitionError
from .kinds import ACCUMULATOR, PIPELINE, PROCESSOR, PRODUCER

if TYPE_CHECKING:
    import copy
    import inspect
else:
    from .lazy_import import copy, inspect

_UNSET: Any = object()

#: How a stage sends an item that ``emit`` does not address by name.
Routing = Literal["broadcast", "round_robin"]
StageT = TypeVar("StageT", bound="Stage")


class StageOptions(TypedDict, total=False):
    """The options every decorator and builder method takes (API.md section 3), so type
    checkers and IDEs know them: ``@mg.processor(threads=4, to="save")``."""

    name: str
    threads: int
    processes: int
    interpreters: int
    strategy: str
    to: str | Sequence[str]
    from_: str | Sequence[str]
    actors: int
    concurrency: int
    routing: Literal["broadcast", "round_robin"]
    queue_size: int | None
    retries: int
    retry_on: type[BaseException] | tuple[type[BaseException], ...]
    retry_backoff: float
    auto_start: bool
    total: int


class AccumulatorOptions(StageOptions, total=False):
    """The stage options plus the accumulator's own."""

    max_size: int
    max_wait: float
    key: Callable[[Any], Any]


#: The largest count an option may give (``queue_size=``, ``max_size=``, ``total=``...): the
#: runtime counts items in 64-bit integers.
_MAX_COUNT = 2**62


def _names(value: str | Iterable[str] | None, stage: str, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise DefinitionError(
            f"stage {stage!r}: {option}= takes a stage name or a list of names, got {value!r}"
        ) from None
    for name in names:
        if not isinstance(name, str):
            raise DefinitionError(f"stage {stage!r}: {option}= names must be str, got {name!r}")
    return names


class Stage:
    """A pipeline stage. Subclass it and override :meth:`process` for a custom stage::

        class Dedupe(mg.Stage):
            def open(self):
                self.seen = set()
            def process(self, item):
                if item not in self.seen:
                    self.seen.add(item)
                    return item

    Each worker gets its own copy of the stage, so state set in :meth:`open` is per worker.
    """

    kind: str = PROCESSOR

    def __new__(cls, *args: Any, **options: Any) -> "Stage":
        # A custom Stage that keeps Stage.__init__: a typo in its options is a
        # DefinitionError naming the stage and the nearest option (not a bare TypeError).
        if cls.__init__ is Stage.__init__:
            name = options.get("name", args[0] if args else None)
            check_options(
                options, name if isinstance(name, str) else cls.__name__, STAGE_OPTIONS | {"name"}
            )
        return super().__new__(cls)

    def __init__(
        self,
        name: str | None = None,
        *,
        threads: int | None = None,
        processes: int | None = None,
        interpreters: int | None = None,
        strategy: str | None = None,
        to: str | Iterable[str] | None = None,
        from_: str | Iterable[str] | None = None,
        actors: int | None = None,
        concurrency: int | None = None,
        routing: str = "broadcast",
        queue_size: int | None = DEFAULT_QUEUE_SIZE,
        retries: int = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
        auto_start: bool = True,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise DefinitionError(f"a stage name must be a non-empty str, got {name!r}")
        self.name: str | None = name
        label = name or type(self).__name__
        self.threads = _positive(threads, "threads", label)
        self.processes = _positive(processes, "processes", label)
        self.interpreters = _positive(interpreters, "interpreters", label)
        self.actors = _positive(actors, "actors", label)
        self.concurrency = _positive(concurrency, "concurrency", label)
        self.strategy = strategies.canonical(strategy, label) if strategy is not None else None
        if self.strategy is not None:
            strategies.check_available(self.strategy, label)
        # A function stage's form is its function's (FunctionStage._set_body).
        own_process = type(self).process is not Stage.process
        if own_process and self.is_async:
            # ``async def process`` runs on the stage's event loop, as async functions do.
            if self.strategy not in (None, "async"):
                raise DefinitionError(
                    f"stage {label!r} has an async def process(), which runs on the stage's "
                    f"event loop (strategy='async'): remove strategy={self.strategy!r}, or "
                    "make process() a plain def"
                )
            self.strategy = "async"
        elif own_process and self.strategy == "async":
            raise DefinitionError(
                f"stage {label!r} has strategy='async' but a plain def process(); define "
                "process() with async def, or choose another strategy"
            )
        self.to = _names(to, label, "to")
        self.from_ = _names(from_, label, "from_")
        if routing not in ("broadcast", "round_robin"):
            raise DefinitionError(
                f"stage {label!r}: routing must be 'broadcast' or 'round_robin', got {routing!r}"
            )
        self.routing: Routing = "round_robin" if routing == "round_robin" else "broadcast"
        if queue_size is not None and not _is_count(queue_size, 1):
            raise DefinitionError(
                f"stage {label!r}: queue_size= must be a positive int (at most 2**62), or None "
                f"for an unbounded queue; got {queue_size!r}"
            )
        self.queue_size = queue_size
        if not _is_count(retries, 0):
            raise DefinitionError(f"stage {label!r}: retries= must be an int >= 0, got {retries!r}")
        self.retries = retries
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        retry_on = tuple(retry_on)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
            raise DefinitionError(
                f"stage {label!r}: retry_on must be exception types, got {retry_on!r}"
            )
        self.retry_on = retry_on
        if (
            not isinstance(retry_backoff, (int, float))
            or isinstance(retry_backoff, bool)
            or not 0 <= retry_backoff <= 3600
        ):
            raise DefinitionError(
                f"stage {label!r}: retry_backoff= must be a number of seconds between 0 and "
                f"3600, got {retry_backoff!r}"
            )
        self.retry_backoff = float(retry_backoff)
        self.auto_start = bool(auto_start)

    # -- identity ---------------------------------------------------------------------

    def __set_name__(self, owner: type, attr: str) -> None:
        # A stage assigned as a class attribute without name= is named after the attribute.
        if self.name is None:
            self.name = attr

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.name!r}>"

    @property
    def is_generator(self) -> bool:
        return is_generator_function(type(self).process)

    @property
    def is_async(self) -> bool:
        """A custom Stage whose ``process`` is ``async def`` (or an async generator)."""
        return is_async_function(type(self).process)

    # -- what subclasses override -----------------------------------------------------

    def open(self) -> None:
        """Called once per worker, in the worker, before its first item."""

    def process(self, item: Any) -> Any:
        """Handle one item. A return value other than None is emitted (a generator's
        yielded values are); :meth:`emit` sends more."""
        raise NotImplementedError(f"{type(self).__name__}.process() is not implemented")

    def close(self) -> None:
        """Called once per worker after its last item; may :meth:`emit`."""

    # -- helpers usable inside a running stage ----------------------------------------

    def emit(self, value: Any, to: str | None = None) -> None:
        """Send ``value`` downstream (to the stage named ``to`` only, if given)."""
        _emit(value, to)

    def trigger(self, name: str) -> None:
        """Start the ``auto_start=False`` producer called ``name``."""
        _trigger(name)


def worker_copy(stage: StageT) -> StageT:
    """The shallow copy of a custom Stage that one worker runs (its ``open``, ``process``
    and ``close``), as ``copy.copy`` makes it.

    Made attribute by attribute rather than by ``copy.copy``'s ``__dict__.update``: on
    free-threaded CPython 3.13 before 3.13.6 that update raises "dict mutated during
    update" when another worker adds an attribute to its own copy at that moment (the
    copies share one keys table; CPython issue 132617). A Stage that defines its own
    ``__copy__``, ``__setstate__`` or ``__reduce_ex__`` is copied by ``copy.copy``.
    """
    cls = type(stage)
    copies_itself = hasattr(cls, "__copy__") or hasattr(cls, "__setstate__")
    if copies_itself or cls.__reduce_ex__ is not object.__reduce_ex__:
        return copy.copy(stage)
    reduced = stage.__reduce_ex__(4)
    if isinstance(reduced, str) or len(reduced) < 3 or not isinstance(reduced[2], dict):
        return copy.copy(stage)
    rebuild, args, state = reduced[:3]
    worker: StageT = rebuild(*args)
    for name, value in list(state.items()):
        worker.__dict__[name] = value
    return worker


def _is_count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= _MAX_COUNT


def _positive(value: int | None, option: str, stage: str) -> int | None:
    if value is None:
        return None
    if not _is_count(value, 1):
        raise DefinitionError(f"stage {stage!r}: {option}= must be a positive int, got {value!r}")
    return value


def check_options(options: dict[str, Any], stage: str, valid: Iterable[str]) -> None:
    """Reject an option no stage takes (a typo such as ``thread=4``), naming the stage and
    the nearest valid option."""
    valid = sorted(valid)
    for option in options:
        if option in valid:
            continue
        import difflib  # noqa: PLC0415 - only to word this error

        nearest = difflib.get_close_matches(option, valid, n=1, cutoff=0.6)
        hint = f"did you mean {nearest[0]}=? " if nearest else ""
        raise DefinitionError(
            f"stage {stage!r}: unknown option {option}=; {hint}(stage options: {', '.join(valid)})"
        )


class _Parameters(NamedTuple):
    """What arity checking needs of a function's parameters."""

    #: The positional parameters, in order, each with whether it has a default.
    positional: list[tuple[str, bool]]
    #: Whether it takes ``*args``.
    varargs: bool
    #: The keyword-only parameters without a default.
    kw_required: list[str]


def _parameters(fn: Callable[..., Any]) -> _Parameters | None:
    """``fn``'s parameters; None for a callable without a signature (some builtins).

    A plain function's are read off its code object, as ``inspect.signature`` would report
    them, in a tenth of the time (a pipeline built per call, as a service does, checks its
    stages on every call); a builtin's are looked up by its text signature
    (``_builtin_parameters``); anything else (a wrapper, a method, a callable object) asks
    ``inspect.signature``.
    """
    if type(fn) is types.FunctionType and not {"__wrapped__", "__signature__"} & fn.__dict__.keys():
        code = fn.__code__
        names, count = code.co_varnames, code.co_argcount
        first_default = count - len(fn.__defaults__ or ())
        keyword_only = names[count : count + code.co_kwonlyargcount]
        keyword_defaults = fn.__kwdefaults__ or {}
        return _Parameters(
            positional=[(names[i], i >= first_default) for i in range(count)],
            varargs=bool(code.co_flags & CO_VARARGS),
            kw_required=[name for name in keyword_only if name not in keyword_defaults],
        )
    if type(fn) in _BUILTIN_KINDS or (isinstance(fn, type) and not fn.__flags__ & _HEAP_TYPE):
        return _builtin_parameters(fn)
    return _signature_parameters(fn)


#: The callables whose signature ``inspect`` parses from their text signature, besides
#: the builtin types (``float``): builtin functions and methods (``print``,
#: ``results.append``), and the slots and methods of builtin types (``str.upper``).
_BUILTIN_KINDS = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
)
#: ``Py_TPFLAGS_HEAPTYPE``: set on classes made at run time, clear on builtin types.
_HEAP_TYPE = 1 << 9

#: A builtin's parameters by what decides them. A builtin type's: the type (its own and
#: its bases' text signatures; builtin types live as long as the process). Any other
#: builtin's: its kind, its text signature, whether it is bound (``inspect`` drops a bound
#: ``$self`` or ``$module``) and its module (which names in its defaults resolve against).
_BUILTIN_PARAMETERS: dict[object, _Parameters | None] = {}


def _builtin_parameters(fn: Callable[..., Any]) -> _Parameters | None:
    """A builtin's parameters, parsed once per text signature. ``inspect.signature``
    parses the text with ``ast`` on every call, a fifth of a one-item run's time with
    ``results.append`` as its consumer, and on free-threaded 3.13 each parse leaves the
    class it defines behind for good: that run, built per call, kept 16 more objects each
    call. The keys are the builtins' text signatures (or builtin types), a fixed set."""
    key: object = fn
    if not isinstance(fn, type):
        module = getattr(fn, "__module__", None) or getattr(
            getattr(fn, "__objclass__", None), "__module__", None
        )
        key = (
            type(fn),
            getattr(fn, "__text_signature__", None),
            getattr(fn, "__self__", None) is not None,
            module,
        )
    try:
        return _BUILTIN_PARAMETERS[key]
    except KeyError:
        parameters = _BUILTIN_PARAMETERS[key] = _signature_parameters(fn)
        return parameters


def _signature_parameters(fn: Callable[..., Any]) -> _Parameters | None:
    """``fn``'s parameters as ``inspect.signature`` reports them."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return _Parameters(
        positional=[
            (p.name, p.default is not p.empty) for p in params if p.kind in positional_kinds
        ],
        varargs=any(p.kind is p.VAR_POSITIONAL for p in params),
        kw_required=[p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty],
    )


def check_arity(fn: Callable[..., Any], kind: str, stage: str, takes_self: bool) -> None:
    """Reject functions whose parameters do not fit the stage kind (API.md section 1)."""
    parameters = _parameters(fn)
    if parameters is None:
        return  # builtins without a signature: trust the caller
    positional, varargs, kw_required = parameters
    if takes_self:
        if not positional:
            raise DefinitionError(f"stage {stage!r}: a Task stage is a method and takes self first")
        positional = positional[1:]
    required = [name for name, has_default in positional if not has_default]
    if kw_required:
        raise DefinitionError(
            f"stage {stage!r}: required keyword-only parameter(s) {', '.join(kw_required)}; "
            "give them defaults or make them positional"
        )
    if kind == PRODUCER:
        if required:
            raise DefinitionError(
                f"producer {stage!r} takes no items but its function requires "
                f"{len(required)} parameter(s) ({', '.join(required)}); "
                f"define it as def {stage}({'self' if takes_self else ''}) and yield the items"
            )
        return
    what = "the batch (a list)" if kind == ACCUMULATOR else "the item"
    if len(required) == 1 or (not required and varargs):
        return
    raise DefinitionError(
        f"{kind} {stage!r} must take exactly one parameter, {what}, but its function "
        f"requires {len(required)}"
        + (f" ({', '.join(required)})" if required else "")
        + f"; define it as def {stage}("
        + ("self, " if takes_self else "")
        + "item)"
    )


class FunctionStage(Stage):
    """A stage whose work is a function: what ``@mg.producer``, ``@mg.processor``,
    ``@mg.consumer``, ``@mg.accumulator`` and the builder methods make."""

    def __init__(
        self,
        kind: str,
        fn: Callable[..., Any] | None,
        *,
        takes_self: bool,
        name: str | None = None,
        max_size: int | None = None,
        max_wait: float | None = None,
        key: Callable[[Any], Any] | None = None,
        total: int | None = None,
        **options: Any,
    ) -> None:
        if name is None and fn is not None:
            name = getattr(fn, "__name__", None)  # two unnamed lambdas collide: "<lambda>"
        label = name or kind
        check_options(options, label, FUNCTION_STAGE_OPTIONS)
        if total is not None and kind != PRODUCER:
            raise DefinitionError(f"{kind} {label!r}: total= is a producer option")
        if total is not None and not _is_count(total, 0):
            raise DefinitionError(
                f"producer {label!r}: total= must be the number of items it emits (an int "
                f">= 0), got {total!r}"
            )
        if kind == ACCUMULATOR:
            if options.get("threads", 1) not in (None, 1):
                raise DefinitionError(
                    f"accumulator {label!r} runs as one worker; remove threads= (it asked for "
                    f"{options['threads']})"
                )
            if options.get("strategy") is not None:
                raise DefinitionError(
                    f"accumulator {label!r} runs in the pipeline's own process; remove "
                    f"strategy={options['strategy']!r} and put the strategy on the stage after it"
                )
            if max_size is not None and not _is_count(max_size, 1):
                raise DefinitionError(
                    f"accumulator {label!r}: max_size must be a positive int, got {max_size!r}"
                )
            if max_wait is not None and (not isinstance(max_wait, (int, float)) or max_wait <= 0):
                raise DefinitionError(
                    f"accumulator {label!r}: max_wait must be a positive number of seconds, "
                    f"got {max_wait!r}"
                )
            if key is not None and not callable(key):
                raise DefinitionError(f"accumulator {label!r}: key must be callable, got {key!r}")
        elif (max_size, max_wait, key) != (None, None, None):
            raise DefinitionError(
                f"{kind} {label!r}: max_size=, max_wait= and key= are accumulator options"
            )
        if kind != PRODUCER and options.get("auto_start", True) is not True:
            raise DefinitionError(f"{kind} {label!r}: auto_start= is a producer option")
        super().__init__(name, **options)
        self.kind = kind
        self.takes_self = takes_self
        self.max_size = max_size
        self.max_wait = None if max_wait is None else float(max_wait)
        self.key = key
        #: A producer's announced item count, for the progress view (None: unknown).
        self.total = total
        self.fn: Callable[..., Any] | None = None
        if fn is not None:
            self._set_body(fn)
        elif kind != ACCUMULATOR:
            raise DefinitionError(f"{kind} {label!r} needs a function")

    def _set_body(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise DefinitionError(f"stage {self.name!r}: expected a function, got {fn!r}")
        label: str = self.name or getattr(fn, "__name__", None) or self.kind
        check_arity(fn, self.kind, label, self.takes_self)
        # What functools.wraps keeps: help(), inspect.signature() and IDEs see the function.
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, attr):
                self.__dict__[attr] = getattr(fn, attr)
        self.__dict__["__wrapped__"] = fn
        # The form is that of what a call runs: a callable object's __call__.
        called = called_function(fn)
        asynchronous = is_async_function(called)
        self._generator = is_generator_function(unwrapped(called))
        if asynchronous and self.kind == PROCESSOR:
            if self.strategy not in (None, "async"):
                raise DefinitionError(
                    f"stage {label!r} is an async def function, which runs on the stage's "
                    f"event loop: remove strategy={self.strategy!r} (or make it a plain def)"
                )
            self.strategy = "async"
            self._auto_async = True
        elif self.strategy == "async" and not asynchronous:
            raise DefinitionError(
                f"stage {label!r} has strategy='async' but is a plain function; define it "
                "with async def"
            )
        self.fn = fn

    @property
    def is_generator(self) -> bool:
        return self.fn is not None and self._generator

    def with_body(self, fn: Callable[..., Any]) -> "FunctionStage":
        """A copy of this stage (same kind and options) running ``fn``."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        if clone._auto_async:
            clone.strategy, clone._auto_async = None, False  # the new body decides
        clone.fn = None
        clone._set_body(fn)
        return clone

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A body-less accumulator used as a decorator takes the function as its body.
        if self.fn is None and len(args) == 1 and not kwargs and callable(args[0]):
            self._set_body(args[0])
            if self._auto_named:
                self.name = getattr(args[0], "__name__", self.name)
            return self
        if self.fn is None:
            raise TypeError(f"accumulator {self.name!r} has no body to call")
        return self.fn(*args, **kwargs)

    def name_after_body(self) -> None:
        """Take the name of the function this body-less accumulator is given as its body
        (it was added without ``name=``)."""
        self._auto_named = True

    _auto_named = False
    #: The strategy is "async" because the body is an async function (not asked for).
    _auto_async = False
    #: The body is a generator function (read once, when the body is set).
    _generator = False

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # On a Task instance the attribute is the plain bound method, so stages can call
        # each other like ordinary methods; on the class it is the Stage.
        if instance is None or self.fn is None or not self.takes_self:
            return self
        return self.fn.__get__(instance, owner)


class NestedStage(Stage):
    """A pipeline used as one stage of another (``mg.nested`` / ``Pipeline.pipeline``)."""

    kind = PIPELINE

    def __init__(self, target: Any, *, name: str | None = None, **options: Any) -> None:
        # Task classes, their instances and Pipelines all have a root pipeline (this module
        # is below the DSL and the builder, so it asks for that rather than their types).
        pipeline = getattr(target, "root_pipeline", None)
        if pipeline is None or not hasattr(pipeline, "stages"):
            raise DefinitionError(
                f"a nested pipeline must be a Task class, a Task instance or a Pipeline, "
                f"got {target!r}"
            )
        if name is None and pipeline is target:
            name = target.name
        check_options(options, name or "nested pipeline", STAGE_OPTIONS)
        super().__init__(name, **options)
        self.target = target


def _keyword_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The parameters a plain function takes by name, in order, read off its code."""
    code = fn.__code__
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


#: Options every stage takes (``Stage.__init__``'s keywords, API.md section 3).
STAGE_OPTIONS = frozenset(_keyword_names(Stage.__init__)) - {"self", "name"}
#: What the decorators and builder methods take: the stage options plus the accumulator
#: and producer ones.
FUNCTION_STAGE_OPTIONS = STAGE_OPTIONS | {"name", "max_size", "max_wait", "key", "total"}
