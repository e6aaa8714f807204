"""The hooks of one run, and the bookkeeping of which stages and pipelines have finished.

``Run`` drives a run; this module says which hooks run when (API.md section 4):
``before_run`` and ``before("stage")`` before anything starts, ``on_error`` for each
failed item (innermost pipeline first), ``after("stage")`` when a stage's last worker
stops, and a nested pipeline's ``after_run`` and its parent's ``after("pipeline")`` when
its last stage finishes. Hooks that run in the parent run on the thread that drives the
run (the one that ran the ``before`` hooks); a stage finishing on a worker thread only
queues its ``after`` hooks for that thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from . import context
from . import hooks as _hooks
from .errors import DefinitionError
from .graph import Graph, Node, Scope
from .kinds import PRODUCER

#: Where a hook failed (a stage's or a pipeline's path, None for the run) and with what.
HookError = tuple[str | None, BaseException]


class RunHooks:
    """The parent-side hooks of one run of ``graph``.

    The run is passed to each method that runs hooks (they run marked as the run's, so
    ``mg.trigger`` in them reaches it), not kept: the runtime keeps callbacks into this
    object, and the run keeps the runtime, so keeping the run would make a reference
    cycle, left for the garbage collector."""

    def __init__(self, graph: Graph) -> None:
        self._graph = graph
        #: The first hook that failed; the run reports it unless a stage failed first.
        self.error: HookError | None = None
        self._scope_left = {id(s): len(graph.nodes_in(s)) for s in graph.scopes()}
        self._scopes_closed: set[int] = set()
        self._scope_lock = threading.Lock()
        #: Appended to by worker threads, emptied by the thread that drives the run.
        self._finished_stages: deque[Node] = deque()

    # -- before the run ---------------------------------------------------------------

    def check_names(self) -> None:
        """Refuse a ``before``/``after`` hook that names no stage of its pipeline."""
        for scope in self._graph.scopes():
            for hook in scope.hooks.all():
                if hook.kind in (_hooks.BEFORE, _hooks.AFTER) and hook.stage not in scope.members:
                    raise DefinitionError(
                        f"@{hook.kind}({hook.stage!r}) names no stage of pipeline "
                        f"{scope.pipeline.name!r} (stages: {', '.join(scope.members)})"
                    )

    def can_start(self) -> bool:
        """Whether anything starts the run by itself: a producer with ``auto_start``, or
        a ``before_run`` hook (which may trigger one)."""
        graph = self._graph
        if any(n.stage.kind == PRODUCER and n.stage.auto_start for n in graph.nodes):
            return True
        return any(s.hooks.of(_hooks.BEFORE_RUN) for s in graph.scopes())

    def before(self, run: context.Run) -> None:
        """Every pipeline's ``before_run``, then its ``before("stage")`` hooks, outermost
        pipeline first. Raises what a hook raised."""
        for scope in self._graph.scopes():
            for hook in scope.hooks.of(_hooks.BEFORE_RUN):
                _call(run, scope, hook)
            for name in scope.members:
                for hook in scope.hooks.of(_hooks.BEFORE, name):
                    _call(run, scope, hook)

    # -- while it runs ----------------------------------------------------------------

    def offer_failure(self, node: Node, error: BaseException, item: object) -> bool:
        """Offer a failed item to the ``on_error`` handlers, innermost pipeline first;
        True when one took it."""
        for scope in node.scope.lineage():
            relative = node.path[len(scope.path) + 1 :] if scope.path else node.path
            for hook in scope.hooks.all():
                if hook.kind == _hooks.ON_ERROR and hook.matches_error(error, relative, node.local):
                    scope.bind(hook)(error, item, node.path)
                    return True
        return False

    def stage_finished(self, node: Node) -> None:
        """A stage's last worker stopped (called on that worker's thread): queue its
        ``after`` hooks for the thread that drives the run."""
        self._finished_stages.append(node)

    def after_finished_stages(self, run: context.Run, stop: Callable[[], None]) -> None:
        """Run the ``after`` hooks of the stages that finished since the last call; a
        failing hook is recorded and ``stop`` stops the run."""
        while True:
            try:
                node = self._finished_stages.popleft()
            except IndexError:
                return
            try:
                self._after_stage(run, node)
            except Exception as exc:  # noqa: BLE001 - reported as the run's failure
                self._record(node.path, exc)
                stop()

    # -- after it ---------------------------------------------------------------------

    def after_run(self, run: context.Run, stage_failed: bool) -> None:
        """The run ended: close the nested pipelines that did not finish (a cancelled or
        failed run), then run the root's ``after_run`` hooks. A failing hook is recorded
        unless a stage failed first."""
        for scope in self._graph.scopes()[1:]:
            try:
                self._close_scope(run, scope)
            except Exception as exc:  # noqa: BLE001 - reported as the run's failure
                if not stage_failed:
                    self._record(scope.path, exc)
        root = self._graph.root
        for hook in root.hooks.of(_hooks.AFTER_RUN):
            try:
                _call(run, root, hook)
            except Exception as exc:  # noqa: BLE001
                if not stage_failed:
                    self._record(None, exc)

    # -- helpers ----------------------------------------------------------------------

    def _record(self, where: str | None, exc: BaseException) -> None:
        if self.error is None:
            self.error = (where, exc)

    def _after_stage(self, run: context.Run, node: Node) -> None:
        for hook in node.scope.hooks.of(_hooks.AFTER, node.local):
            _call(run, node.scope, hook)
        # A nested pipeline finishes with its last stage: its after hooks run then.
        for scope in node.scope.lineage():
            if scope.parent is None:
                break
            with self._scope_lock:
                self._scope_left[id(scope)] -= 1
                finished = self._scope_left[id(scope)] == 0
            if finished:
                self._close_scope(run, scope)

    def _close_scope(self, run: context.Run, scope: Scope) -> None:
        with self._scope_lock:
            if id(scope) in self._scopes_closed:
                return
            self._scopes_closed.add(id(scope))
        parent = scope.parent
        assert parent is not None, "the root pipeline is closed by after_run"
        local = scope.path.rsplit(".", 1)[-1]
        for hook in scope.hooks.of(_hooks.AFTER_RUN):
            _call(run, scope, hook)
        for hook in parent.hooks.of(_hooks.AFTER, local):
            _call(run, parent, hook)


def _call(run: context.Run, scope: Scope, hook: _hooks.Hook) -> None:
    with context.running_hooks_of(run):
        scope.bind(hook)()
