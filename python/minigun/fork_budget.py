"""Planning a run's process budget: ``max_processes`` per pipeline scope, shared by the
fork stages below it.

Per scope, each fork stage holds a standing reservation (a fork_ipc stage one process per
worker, a spawn_fork stage one process: its guaranteed child); what the scope's limit leaves
over is shared by the spawn_fork stages for their second and later concurrent children.
See docs/forking.md, "Limits".

This is planning only: the numbers go to the Rust runtime's ``ChildTable``, which keeps the
books while the run forks (``minigun.children``).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("minigun")


class ForkPlan:
    """The process budget of one run, planned once from its graph and its stages' plans
    (``run.plans``).

    ``limit`` and ``reserved`` map a scope's ``id()`` to its ``max_processes`` and to the
    processes its fork stages reserve; ``ipc_workers`` maps a fork_ipc stage's path to its
    process count (lowered, with a warning, where a scope's fork stages need more than its
    limit together; each keeps one). So children alive in a scope never exceed
    ``max(max_processes, number of fork stages in it)``, and no stage waits on another.
    """

    def __init__(self, graph: Any, plans: Any) -> None:
        self.limit: dict[int, int] = {}
        self.reserved: dict[int, int] = {}
        self.ipc_workers: dict[str, int] = {}
        scopes = graph.scopes()
        for scope in scopes:
            self.limit[id(scope)] = scope.settings["max_processes"]
        forking: list[tuple[Any, str, int]] = []
        for node in graph.nodes:
            strategy, workers = plans[node.path].strategy, plans[node.path].workers
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

    def most_children(self, scopes: list[int]) -> int:
        """The most children a spawn_fork stage in ``scopes`` can ever have alive at once."""
        return 1 + min(max(0, self.limit[s] - self.reserved.get(s, 0)) for s in scopes)
