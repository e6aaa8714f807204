"""Running a pipeline: ``Run`` (a run in progress), ``RunResult`` and ``StageStats``.

A run compiles the pipeline tree into a flat graph, turns every node into a stage spec for
the Rust runtime, runs the hooks around it, and waits without holding the GIL in slices of
50 ms so Ctrl-C and SIGTERM are handled promptly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import signal
import threading
import time
from typing import Any

from . import _minigun, aio, context
from . import hooks as _hooks
from .config import CapWarnings
from .errors import DefinitionError, PipelineError, RoutingError
from .forking import fork_call, reap_run
from .graph import Graph, Node, Scope, compile_graph
from .plan import plan
from .progress import ProgressView
from .stage import ACCUMULATOR, PRODUCER, FunctionStage
from .stats import RunResult, StageInfo, StageStats
from .strategies import FORKING

logger = logging.getLogger("minigun")

_POLL = 0.05


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
        self._caps = CapWarnings()
        self._infos: dict[str, StageInfo] = {}
        self._specs = [self._spec(node) for node in self._graph.nodes]
        self._runtime = _minigun.Runtime(self._specs)
        self._started_at = 0.0
        self._done = threading.Event()
        self._finish_lock = threading.Lock()
        self._result: RunResult | None = None
        self._failure: BaseException | None = None
        self._cancelled = False
        self._hook_error: tuple[str | None, BaseException] | None = None
        self._scope_left = {id(s): len(self._graph.nodes_in(s)) for s in self._graph.scopes()}
        self._scopes_closed: set[int] = set()
        self._scope_lock = threading.Lock()
        self._finished_stages: queue.SimpleQueue[Node] = queue.SimpleQueue()

    # -- building specs ---------------------------------------------------------------

    def _spec(self, node: Node) -> dict[str, Any]:
        stage, settings = node.stage, node.scope.settings
        strategy, workers = plan(stage, settings, self._caps)
        plan_workers = workers
        call: Any = None
        make_worker = None
        mode = "iterate" if stage.kind == PRODUCER or stage.is_generator else "value"
        min_chunk = 1
        if isinstance(stage, FunctionStage):
            fn = stage.fn
            if fn is not None and stage.takes_self:
                owner = node.scope.owner
                if owner is None:
                    raise DefinitionError(f"stage {node.path!r} is a Task method but has no Task")
                fn = fn.__get__(owner, type(owner))
            call = fn
        elif stage.is_async:
            # One thread runs the stage's event loop, `workers` coroutines at a time, each
            # on the one copy of the stage that thread opened.
            make_worker = aio.async_stage(self, node, stage, workers)
            mode, min_chunk, workers = "chunk", workers, 1
        else:
            make_worker = _custom_worker_factory(stage)
        if stage.kind == PRODUCER and self._show_progress:
            call = self._count_total(node, call)
        if call is not None and aio.is_async(call):
            if stage.kind == PRODUCER:
                call = aio.drive_producer(call)
            elif stage.kind == ACCUMULATOR:
                call, mode = aio.drive_body(call), "value"
            else:
                # One thread runs the stage's event loop, `workers` coroutines at a time.
                make_worker = aio.async_call(self, node, call, workers)
                call, mode, min_chunk, workers = None, "chunk", workers, 1
        worker_hooks = _hooks.WorkerHooks(node)
        if worker_hooks:
            call, make_worker = _with_worker_hooks(worker_hooks, strategy, call, mode, make_worker)
        if strategy in FORKING:
            call, mode, workers, make_worker = fork_call(
                self, node, strategy, workers, call, mode, make_worker
            )
        retries = self._caps.cap(
            node.path, "retries", stage.retries, settings["max_retries"], "max_retries"
        )
        self._infos[node.path] = StageInfo(
            kind=stage.kind,
            strategy=strategy,
            workers=plan_workers,
            threads=max(1, workers),
            queue_size=None if stage.kind == PRODUCER else stage.queue_size,
            runs_code=not (isinstance(stage, FunctionStage) and stage.fn is None),
        )
        return {
            "name": node.path,
            "kind": "processor" if stage.kind not in (PRODUCER, ACCUMULATOR) else stage.kind,
            "call": call,
            "mode": mode,
            "make_worker": make_worker,
            "workers": workers,
            "spawn_per_item": strategy == "spawn_thread",
            "queue_size": stage.queue_size,
            "min_chunk": min_chunk,
            "downstream": list(node.downstream),
            "routing": stage.routing,
            "route_names": node.route_names,
            "route_error": self._route_error_factory(node),
            "retries": retries,
            "retry_on": stage.retry_on,
            "retry_backoff": stage.retry_backoff,
            "on_failure": lambda error, item, _name, n=node: self._on_failure(n, error, item),
            "on_finish": lambda _node=node: self._on_stage_finished(_node),
            "auto_start": stage.auto_start,
            "max_size": getattr(stage, "max_size", None) or settings["accumulator_max_single"],
            "max_all": settings["accumulator_max_all"],
            "check_interval": settings["accumulator_check_interval"],
            "max_wait": getattr(stage, "max_wait", None),
            "key": getattr(stage, "key", None),
        }

    def _count_total(self, node: Node, call: Any) -> Any:
        """For the progress view: note a producer's total (its total=, or len() of the
        iterable a non-generator producer returns)."""
        total = getattr(node.stage, "total", None)
        if total is not None:
            self._totals[node.path] = total
        if total is not None or call is None or node.stage.is_generator or aio.is_async(call):
            return call
        produce = call

        def counted() -> Any:
            produced = produce()
            if hasattr(produced, "__len__"):
                self._totals[node.path] = len(produced)
            return produced

        return counted

    def _route_error_factory(self, node: Node) -> Any:
        def route_error(name: str) -> RoutingError:
            downstream = [self._graph.nodes[d].path for d in node.downstream]
            exists = name in self._graph.by_path or any(n.local == name for n in self._graph.nodes)
            if exists:
                declared = sorted({*node.stage.to, *downstream, name})
                return RoutingError(
                    f"stage {node.path!r} emitted to {name!r}, which is not one of its "
                    f"downstream stages ({', '.join(map(repr, downstream)) or 'none'}); "
                    f"declare the edge with to={declared!r} on {node.local!r}"
                )
            return RoutingError(
                f"stage {node.path!r} emitted to {name!r}, but no stage has that name; "
                f"its downstream stages are {', '.join(map(repr, downstream)) or 'none'}"
            )

        return route_error

    # -- callbacks from the runtime ---------------------------------------------------

    def _on_failure(self, node: Node, error: BaseException, item: Any) -> bool:
        """Offer a failed item to the on_error handlers, innermost pipeline first."""
        for scope in node.scope.lineage():
            relative = node.path[len(scope.path) + 1 :] if scope.path else node.path
            for hook in scope.hooks.all():
                if hook.kind == _hooks.ON_ERROR and hook.matches_error(error, relative, node.local):
                    scope.bind(hook)(error, item, node.path)
                    return True
        return False

    def _on_stage_finished(self, node: Node) -> None:
        # Called on the stage's last worker thread: its after hooks run on the thread that
        # ran its before hooks, the one driving the run (see _after_finished_stages).
        logger.debug("stage %r: all workers stopped", node.path)
        self._finished_stages.put(node)

    def _after_finished_stages(self) -> None:
        """Run the after hooks of the stages that finished since the last call; on the
        thread that drives the run, which ran their before hooks."""
        while True:
            try:
                node = self._finished_stages.get_nowait()
            except queue.Empty:
                return
            try:
                self._after_stage(node)
            except Exception as exc:  # noqa: BLE001 - reported as the run's failure
                if self._hook_error is None:
                    self._hook_error = (node.path, exc)
                self._runtime.cancel()

    def _after_stage(self, node: Node) -> None:
        for hook in node.scope.hooks.of(_hooks.AFTER, node.local):
            self._call_hook(node.scope, hook)
        # A nested pipeline finishes with its last stage: its after hooks run then.
        for scope in node.scope.lineage():
            if scope.parent is None:
                break
            with self._scope_lock:
                self._scope_left[id(scope)] -= 1
                finished = self._scope_left[id(scope)] == 0
            if finished:
                self._close_scope(scope)

    def _call_hook(self, scope: Scope, hook: Any) -> None:
        with context.running_hooks_of(self):
            scope.bind(hook)()

    def _close_scope(self, scope: Scope) -> None:
        with self._scope_lock:
            if id(scope) in self._scopes_closed:
                return
            self._scopes_closed.add(id(scope))
        local = scope.path.rsplit(".", 1)[-1]
        for hook in scope.hooks.of(_hooks.AFTER_RUN):
            self._call_hook(scope, hook)
        for hook in scope.parent.hooks.of(_hooks.AFTER, local):
            self._call_hook(scope.parent, hook)

    # -- lifecycle --------------------------------------------------------------------

    def _begin(self) -> None:
        self._started_at = time.perf_counter()
        context.register_run(self)
        scopes = self._graph.scopes()
        try:
            for scope in scopes:
                for hook in scope.hooks.of(_hooks.BEFORE_RUN):
                    self._call_hook(scope, hook)
                for name in scope.members:
                    for hook in scope.hooks.of(_hooks.BEFORE, name):
                        self._call_hook(scope, hook)
        except Exception as exc:
            self._hook_error = (None, exc)
            self._runtime.cancel()
            self._finish()
            assert self._failure is not None
            raise self._failure from exc
        if logger.isEnabledFor(logging.DEBUG):
            for spec in self._specs:
                logger.debug("stage %r: starting %d worker(s)", spec["name"], spec["workers"])
        self._runtime.start()
        if self._show_progress:
            stream = None if self._show_progress is True else self._show_progress
            self._progress = ProgressView(lambda: self.stats, lambda: self._totals, stream).start()

    def _check_hook_names(self, scopes: list[Scope]) -> None:
        for scope in scopes:
            for hook in scope.hooks.all():
                if hook.kind in (_hooks.BEFORE, _hooks.AFTER) and hook.stage not in scope.members:
                    raise DefinitionError(
                        f"@{hook.kind}({hook.stage!r}) names no stage of pipeline "
                        f"{scope.pipeline.name!r} (stages: {', '.join(scope.members)})"
                    )

    def run(self) -> RunResult:
        if not self._has_self_starter():
            raise DefinitionError(
                "no producer of this pipeline starts by itself (all are auto_start=False) and "
                "no before_run hook could trigger one, so run() would wait forever; use "
                "start() and Run.trigger(name) instead"
            )
        self._check_hook_names(self._graph.scopes())
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
            logger.warning("interrupted again: not waiting for the stages still running")
            context.unregister_run(self)  # nor at interpreter exit
            raise
        self._finish()

    def start(self) -> Run:
        self._check_hook_names(self._graph.scopes())
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
            reap_run(self)
            self._after_finished_stages()
            failure = self._runtime.failure()
            for scope in self._graph.scopes()[1:]:
                try:
                    self._close_scope(scope)
                except Exception as exc:  # noqa: BLE001 - reported as the run's failure
                    if failure is None and self._hook_error is None:
                        self._hook_error = (scope.path, exc)
            for hook in self._graph.root.hooks.of(_hooks.AFTER_RUN):
                try:
                    self._call_hook(self._graph.root, hook)
                except Exception as exc:  # noqa: BLE001
                    if failure is None and self._hook_error is None:
                        self._hook_error = (None, exc)
            stats = self.stats
            duration = time.perf_counter() - self._started_at
            if failure is not None:
                stage, exc, item = failure
                result = RunResult("failed", duration, stats, exc)
                self._failure = _pipeline_error(stage, exc, item, result)
            elif self._hook_error is not None:
                stage, exc = self._hook_error
                result = RunResult("failed", duration, stats, exc)
                self._failure = _pipeline_error(stage, exc, None, result)
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

    def _has_self_starter(self) -> bool:
        if any(n.stage.kind == PRODUCER and n.stage.auto_start for n in self._graph.nodes):
            return True
        return any(s.hooks.of(_hooks.BEFORE_RUN) for s in self._graph.scopes())

    # -- the public Run API -----------------------------------------------------------

    @property
    def run_id(self) -> int:
        """The runtime's id of this run (what ``mg.trigger`` matches its caller against)."""
        return self._runtime.run_id

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
            logger.warning(
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


def _custom_worker_factory(stage: Any) -> Any:
    def make_worker() -> tuple[Any, Any]:
        worker = copy.copy(stage)
        worker.open()
        return worker.process, worker.close

    return make_worker


def _with_worker_hooks(
    hooks: _hooks.WorkerHooks, strategy: str, call: Any, mode: str, make_worker: Any
) -> tuple[Any, Any]:
    """Wrap a stage's call (or worker factory) so its worker hooks run in each worker."""
    if strategy in ("spawn_thread", "spawn_fork"):
        # Each item gets a thread or child of its own: that is the worker.
        iterate = mode == "iterate"
        if make_worker is None:
            return hooks.around_item(call, iterate), None
        inner = make_worker

        def make_item_worker() -> tuple[Any, Any]:
            process, close = inner()
            return hooks.around_item(process, iterate), close

        return None, make_item_worker
    if make_worker is None:
        plain = call

        def make_worker() -> tuple[Any, Any]:
            return plain, None

        call = None
    return call, hooks.around_worker(make_worker)


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
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum: int, frame: Any) -> None:
        raise _Terminated()

    try:
        return signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):
        return None


def _restore_signal_handlers(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
