"""Planning a stage: where its work runs and with how many workers, under its pipeline's
limits (API.md sections 2 and 5)."""

from __future__ import annotations

from .stage import ACCUMULATOR, PIPELINE, PRODUCER
from .strategies import canonical, check_available


def plan(stage, settings: dict, caps) -> tuple[str, int]:
    """Where ``stage`` runs and with how many workers, under its pipeline's ``settings``.

    ``caps`` is a :class:`~minigun.config.CapWarnings` (or None to cap silently): a stage's
    explicit request over its pipeline's limit is held at the limit, with one warning.
    """
    name = stage.name or type(stage).__name__
    if stage.kind in (PRODUCER, ACCUMULATOR, PIPELINE):
        return "inline", 1
    strategy = stage.strategy or canonical(settings["default_strategy"], name)
    check_available(strategy, name)

    def capped(asked: int | None, option: str, limit_name: str, default: int) -> int:
        limit = settings[limit_name]
        if asked is None:
            return max(1, min(default, limit))
        return caps.cap(name, option, asked, limit, limit_name) if caps else min(asked, limit)

    if strategy == "inline":
        return strategy, 1
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
        return strategy, capped(
            stage.processes, "processes", "max_processes", settings["max_processes"]
        )
    return strategy, 1
