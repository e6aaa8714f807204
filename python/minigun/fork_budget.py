"""The process budget of a run: ``max_processes`` per pipeline scope, shared by the fork
stages below it, and the table of a run's live children.

Per scope, each fork stage holds a standing reservation (a fork_ipc stage one process per
worker, a spawn_fork stage one process: its guaranteed child); what the scope's limit leaves
over is shared by the spawn_fork stages for their second and later concurrent children.
See docs/forking.md, "Limits".
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

logger = logging.getLogger("minigun")

#: How often a stage waiting for room looks at the run's stop flag.
_POLL = 0.05


class ForkStage(Protocol):
    """What the budget needs to know of a fork stage."""

    path: str
    scopes: list[int]

    def tick(self) -> None:
        """Raise if the run is stopping."""


class Child(Protocol):
    pid: int


class RunForks:
    """Children of one run: the live ones (for clean-up) and the max_processes budget.

    Per pipeline scope, each fork stage below it holds a standing reservation: a fork_ipc
    stage one process per worker, a spawn_fork stage one process (its guaranteed child).
    What the scope's limit leaves over is a pool that spawn_fork stages draw on for their
    second and later concurrent children. So children alive in a scope never exceed
    ``max(max_processes, number of fork stages in it)``, and no stage waits on another.
    """

    def __init__(self, run: Any) -> None:
        self.cond = threading.Condition()
        self.children: dict[int, Any] = {}
        self.limit: dict[int, int] = {}
        self.reserved: dict[int, int] = {}
        self.extra: dict[int, int] = {}
        self.stage_alive: dict[str, int] = {}
        self.ipc_workers: dict[str, int] = {}
        self._plan(run)

    def _plan(self, run: Any) -> None:
        """Reserve the fork stages' processes; lower fork_ipc process counts (each keeps
        one) where a scope's fork stages need more than its max_processes together."""
        scopes = run.graph.scopes()
        for scope in scopes:
            self.limit[id(scope)] = scope.settings["max_processes"]
        forking: list[tuple[Any, str, int]] = []
        for node in run.graph.nodes:
            strategy, workers = run.plans[node.path].strategy, run.plans[node.path].workers
            if strategy in ("fork_ipc", "spawn_fork"):
                forking.append((node, strategy, workers if strategy == "fork_ipc" else 1))
        wanted = {node.path: n for node, _, n in forking}
        count = dict(wanted)
        for scope in scopes:
            members = [n.path for n, _, _ in forking if scope in n.scope.lineage()]
            ipc = [n.path for n, kind, _ in forking if kind == "fork_ipc" and n.path in members]
            while ipc and sum(count[p] for p in members) > self.limit[id(scope)]:
                widest = max(ipc, key=lambda p: count[p])
                if count[widest] <= 1:
                    break
                count[widest] -= 1
        for node, strategy, _ in forking:
            path = node.path
            if count[path] < wanted[path]:
                logger.warning(
                    "stage %r asks for %d fork_ipc processes, but with the other fork stages "
                    "of its pipeline that is more than max_processes=%d; using %d (raise "
                    "max_processes to allow more)",
                    path,
                    wanted[path],
                    node.scope.settings["max_processes"],
                    count[path],
                )
            for scope in node.scope.lineage():
                self.reserved[id(scope)] = self.reserved.get(id(scope), 0) + count[path]
            if strategy == "fork_ipc":
                self.ipc_workers[path] = count[path]

    def acquire(self, fn: ForkStage) -> None:
        """Wait for room for one more spawn_fork child of ``fn``'s stage."""
        with self.cond:
            while True:
                # Checked even when there is room: a child killed because the run stops
                # frees room, and no new child may take it.
                fn.tick()
                if self._room(fn):
                    break
                self.cond.wait(_POLL)
            alive = self.stage_alive.get(fn.path, 0)
            self.stage_alive[fn.path] = alive + 1
            if alive:
                for s in fn.scopes:
                    self.extra[s] = self.extra.get(s, 0) + 1

    def _room(self, fn: ForkStage) -> bool:
        if not self.stage_alive.get(fn.path):
            return True  # the stage's own reserved process
        return all(
            self.extra.get(s, 0) + self.reserved.get(s, 0) < self.limit[s] for s in fn.scopes
        )

    def most_children(self, fn: ForkStage) -> int:
        """The most children ``fn``'s spawn_fork stage can ever have alive at once."""
        return 1 + min(max(0, self.limit[s] - self.reserved.get(s, 0)) for s in fn.scopes)

    def release(self, fn: ForkStage) -> None:
        with self.cond:
            alive = self.stage_alive[fn.path]
            self.stage_alive[fn.path] = alive - 1
            if alive > 1:
                for s in fn.scopes:
                    self.extra[s] -= 1
            self.cond.notify_all()

    def remember(self, child: Child) -> None:
        with self.cond:
            self.children[child.pid] = child

    def forget(self, child: Child) -> None:
        with self.cond:
            self.children.pop(child.pid, None)

    def live(self) -> list[Any]:
        with self.cond:
            return list(self.children.values())
