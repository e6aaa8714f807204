"""Planning a run: how each stage runs under its pipeline's limits (API.md sections 2, 3
and 5), decided once per compiled graph.

``plan_stages`` gives one frozen :class:`StagePlan` per stage; the runtime spec, the run's
summary (``StageInfo``), the fork budget and the Mermaid output all read that one plan, so
they cannot disagree and a capped option warns once.
"""

# No ``from __future__ import annotations`` here: the fields of this module's typed records
# reach ``typing`` as types rather than as strings, each of which it would compile when the
# class is made (20 to 70 µs a field, paid by every ``import minigun``).

from typing import Any, Literal, NamedTuple

from .config import CapWarnings
from .errors import DefinitionError
from .graph import Graph, Node
from .kinds import ACCUMULATOR, PIPELINE, PRODUCER
from .strategies import FORKING, INTERPRETERS, canonical, check_available

#: How the runtime calls a stage for one item: "value" emits the return value unless it is
#: None, "iterate" emits each element of what it returns (producers and generators).
CallMode = Literal["value", "iterate"]


class StagePlan(NamedTuple):
    """How one stage runs."""

    #: The canonical strategy; "inline" for producers, accumulators and nested pipelines.
    strategy: str
    #: Threads, processes or coroutines the strategy runs the stage on, after the limits.
    workers: int
    #: Retries per failed item, after ``max_retries``.
    retries: int
    call_mode: CallMode
    #: The fewest items a chunk for the stage carries when that many are waiting: an async
    #: stage's concurrency, so each chunk can keep every coroutine busy.
    min_chunk: int


def plan_stages(graph: Graph, caps: CapWarnings | None = None) -> dict[str, StagePlan]:
    """The plan of every stage of ``graph``, by path. ``caps`` warns once per stage whose
    explicit request exceeds its pipeline's limit (None: hold it at the limit silently)."""
    plans = {node.path: _plan(node, caps) for node in graph.nodes}
    _check_no_fork_beside_subinterpreters(plans)
    return plans


def _check_no_fork_beside_subinterpreters(plans: dict[str, StagePlan]) -> None:
    """Refuse a run that would fork while it has subinterpreters: CPython deletes a
    process's subinterpreters in a forked child in a way that crashes the child (CPython
    issue 101437, open), so every item of the forking stage would be lost."""
    forking = [(path, plan.strategy) for path, plan in plans.items() if plan.strategy in FORKING]
    sub = [(path, plan.strategy) for path, plan in plans.items() if plan.strategy in INTERPRETERS]
    if forking and sub:
        (fork_path, fork_strategy), (sub_path, sub_strategy) = forking[0], sub[0]
        raise DefinitionError(
            f"stage {fork_path!r} forks (strategy {fork_strategy!r}) in the same run as stage "
            f"{sub_path!r} runs subinterpreters (strategy {sub_strategy!r}): CPython crashes a "
            "child forked while the process has subinterpreters (CPython issue 101437), so "
            "its items would be lost. Give one of them another strategy (threads, or the other "
            "one's), or run them as separate pipelines, one after the other"
        )


def _plan(node: Node, caps: CapWarnings | None) -> StagePlan:
    stage, settings = node.stage, node.scope.settings
    strategy, workers = _placement(node, settings, caps)
    retries = (
        caps.cap(node.path, "retries", stage.retries, settings["max_retries"], "max_retries")
        if caps
        else min(stage.retries, settings["max_retries"])
    )
    iterates = stage.kind == PRODUCER or bool(getattr(stage, "is_generator", False))
    return StagePlan(
        strategy=strategy,
        workers=workers,
        retries=retries,
        call_mode="iterate" if iterates else "value",
        min_chunk=workers if strategy == "async" else 1,
    )


def _placement(node: Node, settings: dict[str, Any], caps: CapWarnings | None) -> tuple[str, int]:
    """Where the stage runs and on how many workers."""
    stage = node.stage
    if stage.kind in (PRODUCER, ACCUMULATOR, PIPELINE):
        return "inline", 1
    name = node.path
    strategy = stage.strategy or canonical(settings["default_strategy"], name)
    check_available(strategy, name)

    def capped(asked: int | None, option: str, limit_name: str, default: int) -> int:
        limit: int = settings[limit_name]
        if asked is None:
            return max(1, min(default, limit))
        return caps.cap(name, option, asked, limit, limit_name) if caps else min(asked, limit)

    if strategy == "threads":
        return strategy, capped(stage.threads, "threads", "max_threads", settings["min_threads"])
    if strategy == "spawn_thread":
        return strategy, capped(stage.threads, "threads", "max_threads", settings["max_threads"])
    if strategy == "fork_ipc":
        return strategy, capped(stage.processes, "processes", "max_processes", 1)
    if strategy == "async":
        # One worker thread runs the stage's event loop; this is its coroutine count.
        return strategy, capped(stage.concurrency, "concurrency", "max_concurrency", 1)
    if strategy == "spawn_fork":
        processes = settings["max_processes"]
        return strategy, capped(stage.processes, "processes", "max_processes", processes)
    if strategy == "interpreters":
        asked = stage.interpreters
        return strategy, capped(asked, "interpreters", "max_interpreters", 1)
    if strategy == "spawn_interpreter":
        most = settings["max_interpreters"]
        return strategy, capped(stage.interpreters, "interpreters", "max_interpreters", most)
    if strategy == "ray":
        # Actors live on the cluster; no pipeline limit bounds how many a stage asks for.
        return strategy, stage.actors or 1
    if strategy == "spawn_ray":
        return strategy, settings["max_ray_tasks"]
    return strategy, 1
