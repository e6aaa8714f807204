"""Planning a run's worker budgets: a limit per pipeline scope (``max_processes``,
``max_interpreters``), shared by the stages below it that start workers of that kind.

Per scope, each such stage holds a standing reservation (a long-lived stage, fork_ipc or
interpreters, one worker per worker it runs; a per-item stage, spawn_fork or
spawn_interpreter, one: its guaranteed worker); what the scope's limit leaves over is
shared by the per-item stages for their second and later concurrent workers. See
docs/forking.md, "Limits".

For processes the numbers go to the Rust runtime's ``ChildTable``, which keeps the books
while the run forks (``minigun.children``); for subinterpreters and Ray tasks,
:class:`Slots` keeps them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

from . import log


class WorkerKind(NamedTuple):
    """One kind of budgeted worker: the limit that bounds it and the strategies using it."""

    #: The pipeline setting that bounds the workers alive at once in a scope.
    limit: str
    #: The strategy whose workers live for the whole run (one reservation per worker).
    long_lived: str
    #: The strategy that starts a worker per input item.
    per_item: str
    #: What the workers are called in a warning ("processes"), and their stages ("fork").
    unit: str
    family: str


PROCESSES = WorkerKind("max_processes", "fork_ipc", "spawn_fork", "processes", "fork")
INTERPRETERS = WorkerKind(
    "max_interpreters", "interpreters", "spawn_interpreter", "interpreters", "interpreter"
)


class BudgetPlan:
    """The budget of one run for one :class:`WorkerKind`, planned once from its graph and
    its stages' plans (``run.plans``).

    ``limit`` and ``reserved`` map a scope's ``id()`` to its limit and to the workers its
    stages reserve; ``long_lived_workers`` maps a long-lived stage's path to its worker
    count (lowered, with a warning, where a scope's stages need more than its limit
    together; each keeps one). So workers alive in a scope never exceed ``max(limit,
    number of such stages in it)``, and no stage waits on another.
    """

    def __init__(self, graph: Any, plans: Any, kind: WorkerKind) -> None:
        self.limit: dict[int, int] = {}
        self.reserved: dict[int, int] = {}
        self.long_lived_workers: dict[str, int] = {}
        scopes = graph.scopes()
        for scope in scopes:
            self.limit[id(scope)] = scope.settings[kind.limit]
        members_of: list[tuple[Any, str, int]] = []
        for node in graph.nodes:
            strategy, workers = plans[node.path].strategy, plans[node.path].workers
            if strategy in (kind.long_lived, kind.per_item):
                members_of.append((node, strategy, workers if strategy == kind.long_lived else 1))
        wanted = {node.path: n for node, _, n in members_of}
        count = dict(wanted)
        for scope in scopes:
            members = [n.path for n, _, _ in members_of if scope in n.scope.lineage()]
            lived = [
                n.path
                for n, strategy, _ in members_of
                if strategy == kind.long_lived and n.path in members
            ]
            while lived and sum(count[p] for p in members) > self.limit[id(scope)]:
                widest = max(lived, key=lambda p: count[p])
                if count[widest] <= 1:
                    break
                count[widest] -= 1
        for node, strategy, _ in members_of:
            path = node.path
            if count[path] < wanted[path]:
                log.warning(
                    "stage %r asks for %d %s %s, but with the other %s stages of its "
                    "pipeline that is more than %s=%d; using %d (raise %s to allow more)",
                    path,
                    wanted[path],
                    kind.long_lived,
                    kind.unit,
                    kind.family,
                    kind.limit,
                    node.scope.settings[kind.limit],
                    count[path],
                    kind.limit,
                )
            for scope in node.scope.lineage():
                self.reserved[id(scope)] = self.reserved.get(id(scope), 0) + count[path]
            if strategy == kind.long_lived:
                self.long_lived_workers[path] = count[path]

    def shared(self, scope: int) -> int:
        """The workers a scope's limit leaves over for per-item stages to share."""
        return max(0, self.limit[scope] - self.reserved.get(scope, 0))

    def most_workers(self, scopes: list[int]) -> int:
        """The most workers a per-item stage in ``scopes`` can ever have alive at once."""
        return 1 + min(self.shared(s) for s in scopes)


#: How often a stage waiting for room checks whether its run is stopping.
_POLL = 0.05

#: A chunk's outcome for the runtime: ``(retries, [(item, exception), ...])``, or None.
Outcome = tuple[int, list[tuple[Any, BaseException]]] | None


class Slots:
    """The books of a per-item strategy's workers while the run goes (subinterpreters,
    Ray tasks): each stage's guaranteed worker, and what the limits of its scopes leave
    over to share (planned by a :class:`BudgetPlan`)."""

    def __init__(self, plan: BudgetPlan) -> None:
        self._changed = threading.Condition()
        self._shared = {scope: plan.shared(scope) for scope in plan.limit}
        self._guaranteed_taken: set[str] = set()

    def acquire(
        self, path: str, scopes: list[int], stopping: Callable[[], bool]
    ) -> Hashable | None:
        """Wait for room for one more worker of stage ``path``: the token to release, or
        None when the run stops first."""
        with self._changed:
            while True:
                if path not in self._guaranteed_taken:
                    self._guaranteed_taken.add(path)
                    return path
                if all(self._shared[s] > 0 for s in scopes):
                    for s in scopes:
                        self._shared[s] -= 1
                    return tuple(scopes)
                if stopping():
                    return None
                self._changed.wait(_POLL)

    def each(
        self,
        path: str,
        scopes: list[int],
        items: list[Any],
        one: Callable[[Any], Outcome],
        stopping: Callable[[], bool],
        stopped: Callable[[], BaseException],
    ) -> Outcome:
        """A per-item stage's chunk: ``one(item)`` for each item in turn, each holding a
        worker's room while it runs; the chunk's outcome (retries and failures summed).
        Raises ``stopped()`` when the run stops while it waits for room."""
        retries = 0
        failures: list[tuple[Any, BaseException]] = []
        for item in items:
            token = self.acquire(path, scopes, stopping)
            if token is None:
                raise stopped()
            try:
                outcome = one(item)
            finally:
                self.release(token)
            if outcome is not None:
                retries += outcome[0]
                failures += outcome[1]
        return (retries, failures) if retries or failures else None

    def release(self, token: Hashable) -> None:
        with self._changed:
            if isinstance(token, str):
                self._guaranteed_taken.discard(token)
            elif isinstance(token, tuple):
                for s in token:
                    self._shared[s] += 1
            self._changed.notify_all()
