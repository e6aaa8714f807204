"""Pipeline limits and settings, their defaults, and how they are scoped.

A setting made on a pipeline applies to it and to every pipeline nested in it that does
not set it itself. The ``max_*`` limits are ceilings: a nested pipeline may lower them, but
a value it sets above its parent's is held at the parent's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import log
from .errors import DefinitionError

DEFAULTS: dict[str, Any] = {
    "max_threads": 5,
    "max_processes": 2,
    "max_interpreters": 2,
    "min_threads": 1,
    "max_retries": 3,
    "accumulator_max_single": 2000,
    "accumulator_max_all": 4000,
    "accumulator_check_interval": 100,
    "use_ipc": False,
    "default_strategy": "threads",
    "max_concurrency": 100,
    "max_ray_tasks": 8,
    "ray_address": None,
    # Ray's runtime_env for the run's workers (working_dir, py_modules, env_vars, ...).
    "ray_runtime_env": None,
}

ALIASES = {"max_ractors": "max_interpreters"}

#: Limits a nested pipeline can lower but never raise above its parent's.
CEILINGS = (
    "max_threads",
    "max_processes",
    "max_interpreters",
    "max_retries",
    "max_concurrency",
    "max_ray_tasks",
)

_POSITIVE = (
    "max_threads",
    "max_processes",
    "max_interpreters",
    "min_threads",
    "accumulator_max_single",
    "accumulator_max_all",
    "accumulator_check_interval",
    "max_concurrency",
    "max_ray_tasks",
)

#: Default capacity of a stage's input channel, in items.
DEFAULT_QUEUE_SIZE = 1000

#: Default base delay of retry backoff, in seconds (doubled per attempt, with jitter).
DEFAULT_RETRY_BACKOFF = 0.05


def normalize(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check names and values of user-given settings; resolve aliases."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        name = ALIASES.get(name, name)
        if name not in DEFAULTS:
            known = ", ".join(sorted(DEFAULTS))
            raise DefinitionError(f"{where}: unknown setting {name!r}; known settings: {known}")
        if name in _POSITIVE or name == "max_retries":
            if not isinstance(value, int) or isinstance(value, bool):
                raise DefinitionError(f"{where}: {name} must be an int, got {value!r}")
            low = 0 if name == "max_retries" else 1
            if value < low:
                raise DefinitionError(f"{where}: {name} must be at least {low}, got {value}")
        out[name] = value
    return out


def scope(parent: Mapping[str, Any] | None, own: Mapping[str, Any]) -> dict[str, Any]:
    """The effective settings of a pipeline whose parent has ``parent`` and which sets ``own``."""
    effective = dict(DEFAULTS if parent is None else parent)
    for name, value in own.items():
        if parent is not None and name in CEILINGS:
            value = min(value, parent[name])
        effective[name] = value
    return effective


class CapWarnings:
    """Logs each capped request once per run."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def cap(self, stage: str, option: str, asked: int, limit: int, limit_name: str) -> int:
        if asked <= limit:
            return asked
        if (stage, option) not in self._seen:
            self._seen.add((stage, option))
            log.warning(
                "stage %r asks for %s=%d but its pipeline allows %s=%d; using %d "
                "(raise %s on the Task or pipeline to allow more)",
                stage,
                option,
                asked,
                limit_name,
                limit,
                limit,
                limit_name,
            )
        return limit


class RetryPolicy:
    """A stage's ``retries=`` (held at its pipeline's ``max_retries``), ``retry_on=`` and
    backoff, for the strategies that retry outside the Rust worker loop (fork_ipc workers,
    async stages). The delay matches the runtime's: ``retry_backoff * 2^(attempt-1)``
    times a random factor in [0.5, 1.5), at most 60 s."""

    def __init__(self, stage: Any, settings: Mapping[str, Any]) -> None:
        self.retries = min(stage.retries, settings["max_retries"])
        self.retry_on = stage.retry_on
        self.backoff = stage.retry_backoff

    @classmethod
    def never(cls) -> RetryPolicy:
        """No retries (for a worker that never runs an item)."""
        policy = cls.__new__(cls)
        policy.retries, policy.retry_on, policy.backoff = 0, (), 0.0
        return policy

    def delay(self, attempt: int) -> float:
        import random  # noqa: PLC0415 - at the first retry: most processes never retry

        delay: float = self.backoff * 2 ** (attempt - 1) * (0.5 + random.random())
        return min(60.0, delay)
