"""The builder API: ``mg.Pipeline`` (API.md section 7).

A Pipeline is an ordered list of stages, a set of hooks and its settings. The class DSL
builds one of these per Task class (``Task.root_pipeline``); both run on the same runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Unpack, overload

from . import config as _config
from . import hooks as _hooks
from .errors import DefinitionError
from .graph import compile_graph
from .kinds import ACCUMULATOR, PROCESSOR, PRODUCER
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


class Pipeline:
    """A pipeline built step by step::

    p = mg.Pipeline("etl", config={"max_threads": 8})

    @p.producer
    def numbers():
        yield from range(100)

    p.consumer(print)
    p.run()
    """

    def __init__(self, name: str = "pipeline", config: Mapping[str, Any] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise DefinitionError(f"a pipeline name must be a non-empty str, got {name!r}")
        self.name = name
        self.config = _config.normalize(config or {}, f"pipeline {name!r}")
        self.stages: list[Stage] = []
        self.hooks = _hooks.HookSet()
        #: Set on the pipelines Task classes build: reads the settings a Task class (and
        #: its instance, the argument) sets as attributes.
        self.settings_of: Callable[[Any], dict[str, Any]] | None = None

    @property
    def root_pipeline(self) -> Pipeline:
        """A Pipeline is its own root pipeline (as a Task class has one): whatever has a
        ``root_pipeline`` can be nested."""
        return self

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: {', '.join(s.name or '?' for s in self.stages)}>"

    # -- stages -----------------------------------------------------------------------

    def add(self, stage: Stage) -> Stage:
        """Add a stage (a custom :class:`~minigun.Stage` instance, for example)."""
        if not isinstance(stage, Stage):
            raise DefinitionError(f"Pipeline.add() takes a minigun Stage, got {stage!r}")
        if stage.name is None:
            stage.name = type(stage).__name__
        for other in self.stages:
            if other.name == stage.name:
                raise DefinitionError(
                    f"pipeline {self.name!r} already has a stage named {stage.name!r}; "
                    "pass name=... to tell them apart (two unnamed lambdas collide: name them)"
                )
        self.stages.append(stage)
        return stage

    def _function_stage(
        self, kind: str, fn: Callable[..., Any] | None, options: dict[str, Any]
    ) -> Any:
        if fn is None:
            return lambda f: self._function_stage(kind, f, options)
        return self.add(FunctionStage(kind, fn, takes_self=False, **options))

    @overload
    def producer(
        self, fn: Callable[..., Any], /, **options: Unpack[StageOptions]
    ) -> FunctionStage: ...
    @overload
    def producer(
        self, fn: None = None, /, **options: Unpack[StageOptions]
    ) -> Callable[[Callable[..., Any]], FunctionStage]: ...
    def producer(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Add a producer: a function of no arguments that yields (or returns) items."""
        return self._function_stage(PRODUCER, fn, options)

    @overload
    def processor(
        self, fn: Callable[..., Any], /, **options: Unpack[StageOptions]
    ) -> FunctionStage: ...
    @overload
    def processor(
        self, fn: None = None, /, **options: Unpack[StageOptions]
    ) -> Callable[[Callable[..., Any]], FunctionStage]: ...
    def processor(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Add a processor: a function of one item; its non-None return value is emitted."""
        return self._function_stage(PROCESSOR, fn, options)

    @overload
    def consumer(
        self, fn: Callable[..., Any], /, **options: Unpack[StageOptions]
    ) -> FunctionStage: ...
    @overload
    def consumer(
        self, fn: None = None, /, **options: Unpack[StageOptions]
    ) -> Callable[[Callable[..., Any]], FunctionStage]: ...
    def consumer(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Add a consumer (the same as a processor; the name documents intent)."""
        return self._function_stage(PROCESSOR, fn, options)

    def accumulator(
        self, fn: Callable[..., Any] | None = None, /, **options: Unpack[AccumulatorOptions]
    ) -> FunctionStage:
        """Add an accumulator that collects items into lists of up to ``max_size``.

        Without a function it is added at once (named ``"accumulator"`` unless ``name=``)
        and emits each batch; decorating a function with the returned stage gives it that
        body (and, without ``name=``, the function's name).
        """
        if fn is not None:
            return self._added(FunctionStage(ACCUMULATOR, fn, takes_self=False, **options))
        named = options.get("name") is not None
        options.setdefault("name", "accumulator")
        stage = FunctionStage(ACCUMULATOR, None, takes_self=False, **options)
        if not named:
            stage.name_after_body()
        return self._added(stage)

    def _added(self, stage: FunctionStage) -> FunctionStage:
        self.add(stage)
        return stage

    def pipeline(self, other: Any, /, *, name: str | None = None, **options: Any) -> Stage:
        """Nest another Pipeline (or a Task class or instance) as one stage."""
        return self.add(NestedStage(other, name=name, **options))

    # -- hooks ------------------------------------------------------------------------

    def _register(
        self,
        kind: str,
        fn: Callable[..., Any],
        stage: str | None = None,
        errors: tuple[type[BaseException], ...] = (Exception,),
        prepend: bool = False,
    ) -> Callable[..., Any]:
        if not callable(fn):
            raise DefinitionError(f"{kind}() registers a function, got {fn!r}")
        self.hooks.add(_hooks.Hook(kind, fn, stage, errors, prepend))
        return fn

    def before_run(self, fn: Callable[..., Any] | None = None, *, prepend: bool = False) -> Any:
        if fn is None:
            return lambda f: self._register(_hooks.BEFORE_RUN, f, prepend=prepend)
        return self._register(_hooks.BEFORE_RUN, fn, prepend=prepend)

    def after_run(self, fn: Callable[..., Any] | None = None, *, prepend: bool = False) -> Any:
        if fn is None:
            return lambda f: self._register(_hooks.AFTER_RUN, f, prepend=prepend)
        return self._register(_hooks.AFTER_RUN, fn, prepend=prepend)

    def _scoped(self, kind: str, stage: Any, prepend: bool, required: bool) -> Any:
        if callable(stage) and not isinstance(stage, str):
            if required:
                raise DefinitionError(f"{kind}() needs a stage name: p.{kind}('stage')(fn)")
            return self._register(kind, stage, prepend=prepend)
        if required and not isinstance(stage, str):
            raise DefinitionError(f"{kind}() needs a stage name: p.{kind}('stage')(fn)")
        return lambda f: self._register(kind, f, stage, prepend=prepend)

    def before_fork(self, stage: Any = None, *, prepend: bool = False) -> Any:
        return self._scoped(_hooks.BEFORE_FORK, stage, prepend, required=False)

    def after_fork(self, stage: Any = None, *, prepend: bool = False) -> Any:
        return self._scoped(_hooks.AFTER_FORK, stage, prepend, required=False)

    def before(self, stage: str, *, prepend: bool = False) -> Any:
        return self._scoped(_hooks.BEFORE, stage, prepend, required=True)

    def after(self, stage: str, *, prepend: bool = False) -> Any:
        return self._scoped(_hooks.AFTER, stage, prepend, required=True)

    def _worker_hook(self, kind: str, fn: Any, stage: Any, prepend: bool) -> Any:
        if isinstance(fn, (str, list, tuple)):
            fn, stage = None, fn
        names = _hooks.stage_names(kind, stage)

        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            for name in names:
                self._register(kind, f, name, prepend=prepend)
            return f

        return register if fn is None else register(fn)

    def before_worker(
        self, fn: Any = None, /, stage: str | list[str] | None = None, *, prepend: bool = False
    ) -> Any:
        """Register ``fn()`` to run in every worker (of the stages named by ``stage=``)
        before its first item, on the worker's own thread and in its own process."""
        return self._worker_hook(_hooks.BEFORE_WORKER, fn, stage, prepend)

    def after_worker(
        self, fn: Any = None, /, stage: str | list[str] | None = None, *, prepend: bool = False
    ) -> Any:
        """Register ``fn()`` to run in every worker (of the stages named by ``stage=``)
        after its last item, on the worker's own thread and in its own process."""
        return self._worker_hook(_hooks.AFTER_WORKER, fn, stage, prepend)

    def on_error(self, *types: Any, stage: str | None = None, prepend: bool = False) -> Any:
        """Register ``handler(error, item, stage)`` for items failing with ``types``."""
        if len(types) == 1 and callable(types[0]) and not isinstance(types[0], type):
            return self._register(_hooks.ON_ERROR, types[0], None, (Exception,), prepend)
        errors = _hooks.error_types(types)
        return lambda f: self._register(_hooks.ON_ERROR, f, stage, errors, prepend)

    # -- settings ---------------------------------------------------------------------

    def settings_for(self, owner: Any) -> dict[str, Any]:
        """The settings this pipeline sets itself, read from ``owner`` for Task pipelines."""
        own = dict(self.config)
        if self.settings_of is not None:
            own.update(self.settings_of(owner))
        return own

    # -- running ----------------------------------------------------------------------

    def run(self, **options: Any) -> RunResult:
        """Run to completion and return the :class:`RunResult`; raises
        :class:`PipelineError` if the run failed."""
        return Run(self, None, options).run()

    def start(self, **options: Any) -> Run:
        """Start running in the background and return the :class:`Run`."""
        return Run(self, None, options).start()

    def to_mermaid(self) -> str:
        """A Mermaid ``flowchart`` of the graph, nested pipelines as subgraphs."""
        return mermaid.render(compile_graph(self, None))
