"""Running a pipeline: ``Run`` (a run in progress), ``RunResult`` and ``StageStats``.

A run compiles the pipeline tree into a flat graph, turns every node into a stage spec for
the Rust runtime, runs the hooks around it, and waits without holding the GIL in slices of
50 ms so Ctrl-C and SIGTERM are handled promptly.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found,unused-ignore]  # signal's C module
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import context, log
from . import hooks as _hooks
from .callables import runs_async
from .config import CapWarnings
from .errors import DefinitionError, PipelineError, RoutingError
from .executors import executor_for
from .graph import Graph, Node, compile_graph
from .kinds import ACCUMULATOR, PRODUCER
from .native import RuntimeKind, StageSpec, ext
from .plan import StagePlan, plan_stages
from .run_hooks import RunHooks
from .stage import FunctionStage, worker_copy
from .stats import RunResult, StageInfo, StageStats
from .strategies import PER_ITEM
from .work import Call, Close, StageCode, Start, finish_run

if TYPE_CHECKING:
    from . import aio, progress
    from .progress import ProgressView
else:
    from .lazy_import import ImportedOnFirstUse

    # Loaded by the first run with an async producer or accumulator, or with progress=.
    aio = ImportedOnFirstUse("minigun.aio")
    progress = ImportedOnFirstUse("minigun.progress")

_POLL = 0.05

_RUNTIME_KINDS: dict[str, RuntimeKind] = {PRODUCER: "producer", ACCUMULATOR: "accumulator"}


class _Terminated(BaseException):
    """Raised in the main thread by our SIGTERM handler while run() waits."""


class Run:
    """A pipeline run. ``Task().start()`` returns one running in the background."""

    def __init__(self, pipeline: Any, owner: Any, options: dict[str, Any]) -> None:
        options = dict(options)
        # progress=True draws on stderr; a text stream (progress=sys.stdout) draws there.
        self._show_progress: Any = options.pop("progress", False)
        #: Producers' item counts, where known: their total= or len() of what they return.
        self._totals: dict[str, int] = {}
        self._progress: ProgressView | None = None
        self._graph: Graph = compile_graph(pipeline, owner, options)
        self._plans = plan_stages(self._graph, CapWarnings())
        self._hooks = RunHooks(self._graph)
        self._infos: dict[str, StageInfo] = {}
        self._specs = [self._spec(node) for node in self._graph.nodes]
        self._runtime = ext.Runtime(self._specs)
        self._started_at = 0.0
        self._done = threading.Event()
        self._finish_lock = threading.Lock()
        self._result: RunResult | None = None
        self._failure: BaseException | None = None
        self._cancelled = False

    # -- building specs ---------------------------------------------------------------

    def _spec(self, node: Node) -> StageSpec:
        stage, plan = node.stage, self._plans[node.path]
        work = executor_for(plan.strategy)(self, node, plan, self._code(node, plan))
        self._infos[node.path] = StageInfo(
            kind=stage.kind,
            strategy=plan.strategy,
            workers=plan.workers,
            threads=max(1, work.threads),
            queue_size=None if stage.kind == PRODUCER else stage.queue_size,
            runs_code=not (isinstance(stage, FunctionStage) and stage.fn is None),
        )
        settings = node.scope.settings
        return {
            "name": node.path,
            "kind": _RUNTIME_KINDS.get(stage.kind, "processor"),
            "call": work.call,
            "mode": work.mode,
            "make_worker": work.make_worker,
            "workers": work.threads,
            "spawn_per_item": work.per_item,
            "inline": plan.strategy == "inline",
            "queue_size": stage.queue_size,
            "min_chunk": work.min_chunk,
            "downstream": list(node.downstream),
            "routing": stage.routing,
            "route_names": node.route_names,
            "route_error": self._graph.route_error(node),
            "retries": plan.retries,
            "retry_on": stage.retry_on,
            "retry_backoff": stage.retry_backoff,
            "on_failure": self._failure_handler(node),
            "on_finish": functools.partial(self._hooks.stage_finished, node),
            "auto_start": stage.auto_start,
            "max_size": getattr(stage, "max_size", None) or settings["accumulator_max_single"],
            "max_all": settings["accumulator_max_all"],
            "check_interval": settings["accumulator_check_interval"],
            "max_wait": getattr(stage, "max_wait", None),
            "key": getattr(stage, "key", None),
        }

    def _failure_handler(self, node: Node) -> Callable[[BaseException, Any, str], bool]:
        hooks = self._hooks  # not self: the runtime, which self keeps, keeps this handler

        def on_failure(error: BaseException, item: Any, _stage: str) -> bool:
            return hooks.offer_failure(node, error, item)

        return on_failure

    def _code(self, node: Node, plan: StagePlan) -> StageCode:
        """The stage's code, ready for its executor: a function bound to its Task (async
        producers and accumulator bodies driven on a loop of their own), or a custom
        Stage's worker factory; with the progress view's counting and the worker hooks."""
        stage = node.stage
        call: Any = None
        start: Start | None = None
        if isinstance(stage, FunctionStage):
            call = stage.fn
            if call is not None and stage.takes_self:
                owner = node.scope.owner
                if owner is None:
                    raise DefinitionError(f"stage {node.path!r} is a Task method but has no Task")
                call = call.__get__(owner, type(owner))
        else:
            start = _custom_worker_factory(stage)
        if stage.kind == PRODUCER and self._show_progress:
            call = self._count_total(node, call)
        if call is not None and runs_async(call):
            if stage.kind == PRODUCER:
                call = aio.drive_producer(call)
            elif stage.kind == ACCUMULATOR:
                call = aio.drive_body(call)
        worker_hooks = _hooks.WorkerHooks(node)
        if worker_hooks:
            return _with_worker_hooks(worker_hooks, plan, StageCode(call, start))
        return StageCode(call, start)

    def _count_total(self, node: Node, call: Any) -> Any:
        """For the progress view: note a producer's total (its total=, or len() of the
        iterable a non-generator producer returns)."""
        total = getattr(node.stage, "total", None)
        if total is not None:
            self._totals[node.path] = total
        if total is not None or call is None or node.stage.is_generator or runs_async(call):
            return call
        produce = call

        def counted() -> Any:
            produced = produce()
            if hasattr(produced, "__len__"):
                self._totals[node.path] = len(produced)
            return produced

        return counted

    # -- lifecycle --------------------------------------------------------------------

    def _begin(self) -> None:
        self._started_at = time.perf_counter()
        context.register_run(self)
        try:
            self._hooks.before(self)
        except Exception as exc:
            self._hooks.error = (None, exc)
            self._runtime.cancel()
            self._finish()
            assert self._failure is not None
            raise self._failure from exc
        if log.debug_enabled():
            for spec in self._specs:
                log.debug("stage %r: starting %d worker(s)", spec["name"], spec["workers"])
        self._runtime.start()
        if self._show_progress:
            stream = None if self._show_progress is True else self._show_progress
            self._progress = progress.ProgressView(
                lambda: self.stats, lambda: self._totals, stream
            ).start()

    def _after_finished_stages(self) -> None:
        self._hooks.after_finished_stages(self, self._runtime.cancel)

    def run(self) -> RunResult:
        if not self._hooks.can_start():
            raise DefinitionError(
                "no producer of this pipeline starts by itself (all are auto_start=False) and "
                "no before_run hook could trigger one, so run() would wait forever; use "
                "start() and Run.trigger(name) instead"
            )
        self._hooks.check_names()
        handlers = _install_signal_handlers()
        try:
            self._begin()
            try:
                while not self._runtime.wait(_POLL):
                    self._after_finished_stages()
            except (KeyboardInterrupt, _Terminated) as interrupt:
                # A second Ctrl-C (or SIGTERM) during the clean-up abandons it at once.
                with contextlib.suppress(KeyboardInterrupt, _Terminated):
                    self._interrupt()
                if isinstance(interrupt, _Terminated):
                    raise SystemExit(143) from None
                raise
            return self._finish_and_raise()
        finally:
            _restore_signal_handlers(handlers)

    def _interrupt(self) -> None:
        """Ctrl-C or SIGTERM in run(): stop, clean up, and let the caller re-raise."""
        self._cancelled = True
        self._runtime.cancel()
        try:
            while not self._runtime.wait(_POLL):
                pass
        except (KeyboardInterrupt, _Terminated):
            log.warning("interrupted again: not waiting for the stages still running")
            context.unregister_run(self)  # nor at interpreter exit
            raise
        self._finish()

    def start(self) -> Run:
        self._hooks.check_names()
        # The background thread runs every hook that runs in the parent, so before("stage")
        # and after("stage") share a thread as they do under run().
        begun = threading.Event()
        failed: list[BaseException] = []

        def drive() -> None:
            try:
                self._begin()
            except BaseException as exc:  # noqa: BLE001 - raised by start() below
                failed.append(exc)
                return
            finally:
                begun.set()
            self._watch()

        threading.Thread(target=drive, name="minigun-run", daemon=True).start()
        begun.wait()
        if failed:
            raise failed[0]
        return self

    def _watch(self) -> None:
        while not self._runtime.wait(_POLL):
            self._after_finished_stages()
        self._finish()

    def _finish(self) -> RunResult:
        with self._finish_lock:
            if self._result is not None:
                return self._result
            self._runtime.join()
            if self._progress is not None:
                self._progress.stop()
            finish_run(self)
            self._after_finished_stages()
            failure = self._runtime.failure()
            self._hooks.after_run(self, stage_failed=failure is not None)
            stats = self.stats
            duration = time.perf_counter() - self._started_at
            if failure is not None:
                failed_stage, exc, item = failure
                result = RunResult("failed", duration, stats, exc)
                self._failure = _pipeline_error(failed_stage, exc, item, result)
            elif self._hooks.error is not None:
                where, exc = self._hooks.error
                result = RunResult("failed", duration, stats, exc)
                self._failure = _pipeline_error(where, exc, None, result)
            elif self._cancelled:
                result = RunResult("cancelled", duration, stats)
            else:
                result = RunResult("ok", duration, stats)
            self._result = result
            context.unregister_run(self)
            self._done.set()
            return result

    def _finish_and_raise(self) -> RunResult:
        result = self._finish()
        if self._failure is not None:
            raise self._failure from self._failure.__cause__
        return result

    # -- the public Run API -----------------------------------------------------------

    @property
    def run_id(self) -> int:
        """The runtime's id of this run (what ``mg.trigger`` matches its caller against)."""
        return self._runtime.run_id

    @property
    def graph(self) -> Graph:
        """The run's compiled graph (what executors place stages of)."""
        return self._graph

    @property
    def plans(self) -> Mapping[str, StagePlan]:
        """Every stage's plan, by path (see minigun.plan)."""
        return self._plans

    @property
    def runtime(self) -> ext.Runtime:
        """The Rust runtime of this run (fork executors wait on its shutdown signal)."""
        return self._runtime

    def detach_runtime(self, stand_in: Any) -> ext.Runtime:
        """In a forked child: put ``stand_in`` where the run's runtime was (the runtime is
        the parent's), and return the runtime, which the child keeps alive: freeing it
        would run the extension's code there."""
        runtime, self._runtime = self._runtime, stand_in
        return runtime

    def input_waiting(self, node: Node) -> bool:
        """Whether items wait in the input queue of ``node`` now (cheap: one atomic read)."""
        return self._runtime.input_waiting(node.index)

    @property
    def stopping(self) -> bool:
        """True once the run was cancelled or failed (workers are winding down)."""
        return self._runtime.stopping

    @property
    def running(self) -> bool:
        """True until every stage has finished and the run's clean-up is done."""
        return not self._done.is_set()

    @property
    def stats(self) -> dict[str, StageStats]:
        """A live snapshot of the per-stage counters."""
        return {
            k: StageStats.from_runtime(v, self._infos.get(k))
            for k, v in self._runtime.stats().items()
        }

    def wait(self, timeout: float | None = None) -> RunResult:
        """Wait for the run to end and return its result. Raises TimeoutError if it is
        still running after ``timeout`` seconds and the run's PipelineError if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the run is still running after {timeout} s")
        assert self._result is not None
        if self._failure is not None:
            raise self._failure from self._failure.__cause__
        return self._result

    def cancel(self) -> None:
        """Stop the run: no new items are started; workers finish the item in hand."""
        if self._done.is_set():
            return
        self._cancelled = True
        self._runtime.cancel()

    def stop_for_exit(self, grace: float) -> None:
        """Interpreter exit: wait up to ``grace`` seconds for the cancelled run to end."""
        if not self._done.wait(grace):
            log.warning(
                "interpreter exit: a background run did not stop within %.0f s "
                "(a stage is still in user code)",
                grace,
            )

    def has_stage(self, name: str) -> bool:
        return self._find(name) is not None

    def _find(self, name: str) -> Node | None:
        if name in self._graph.by_path:
            return self._graph.by_path[name]
        matches = [n for n in self._graph.nodes if n.local == name]
        return matches[0] if len(matches) == 1 else None

    def trigger(self, name: str) -> None:
        """Start the ``auto_start=False`` producer called ``name``."""
        node = self._find(name)
        if node is None:
            raise RoutingError(f"trigger({name!r}): the pipeline has no stage named {name!r}")
        outcome = self._runtime.trigger(node.index)
        if outcome == "not_producer":
            raise RoutingError(
                f"trigger({name!r}): {name!r} is a {node.stage.kind}, not a producer; only "
                "producers declared with auto_start=False can be triggered"
            )
        if outcome == "already":
            raise RoutingError(f"trigger({name!r}): producer {name!r} has already started")


def _custom_worker_factory(stage: Any) -> Start:
    def make_worker() -> tuple[Call, Close]:
        worker = worker_copy(stage)
        worker.open()
        return worker.process, worker.close

    return make_worker


def _with_worker_hooks(hooks: _hooks.WorkerHooks, plan: StagePlan, code: StageCode) -> StageCode:
    """Wrap a stage's code so its worker hooks run in each of its workers."""
    if plan.strategy in PER_ITEM:
        # Each item gets a thread or child of its own: that is the worker.
        iterate = plan.call_mode == "iterate"
        if code.start is None:
            assert code.call is not None, "a per-item strategy runs a processor's function"
            return StageCode(call=hooks.around_item(code.call, iterate))
        inner = code.start

        def start_item_worker() -> tuple[Call, Close]:
            process, close = inner()
            assert process is not None, "a custom Stage's worker has a process()"
            return hooks.around_item(process, iterate), close

        return StageCode(start=start_item_worker)
    return StageCode(start=hooks.around_worker(code.starter()))


def _pipeline_error(
    stage: str | None, exc: BaseException, item: Any, result: RunResult
) -> PipelineError:
    where = f"stage {stage!r}" if stage else "a hook"
    on = f" on item {_short(item)}" if item is not None else ""
    err = PipelineError(
        f"{where} failed{on}: {type(exc).__name__}: {exc}", stage=stage, item=item, result=result
    )
    err.__cause__ = exc
    return err


def _short(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= 80 else text[:77] + "..."


def _install_signal_handlers() -> Any:
    """Make SIGTERM raise in the main thread while a run waits there; the handler it
    replaces (None where there is nothing to restore).

    Through ``_signal``, the C module under ``signal``: ``signal.signal`` turns the handler
    it returns into a ``Handlers`` member where it can, and for a function, such as this
    handler when it is restored, that costs an exception (3.6 µs of every run, before)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum: int, frame: Any) -> None:
        raise _Terminated()

    try:
        return _signal.signal(_signal.SIGTERM, on_term)
    except (ValueError, OSError):
        return None


def _restore_signal_handlers(previous: Any) -> None:
    if previous is not None:
        _signal.signal(_signal.SIGTERM, previous)
