"""The errors minigun raises. Every one derives from :class:`MinigunError`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .stats import RunResult


class MinigunError(Exception):
    """Base class of every error minigun raises."""


class DefinitionError(MinigunError):
    """A Task or Pipeline is defined wrongly; raised before anything runs."""


class RoutingError(MinigunError):
    """An item was sent to a stage that is not a declared downstream, or a trigger named
    something that cannot be triggered."""


class UnsupportedStrategy(MinigunError):
    """The running Python (or platform) cannot provide the strategy a stage asks for."""


class PipelineError(MinigunError):
    """A run failed. ``__cause__`` is the original exception, ``stage`` names the stage it
    came from, ``item`` is the item being processed (``None`` for producers and hooks) and
    ``result`` is the run's :class:`RunResult` (status ``"failed"``)."""

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        item: Any = None,
        result: RunResult,
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.item = item
        self.result: RunResult = result


class WorkerError(MinigunError):
    """A worker process or interpreter failed in a way that has no exception of its own
    to re-raise: it died from a signal, exited early, or raised something unpicklable."""

    def __init__(self, message: str, *, traceback_text: str | None = None) -> None:
        super().__init__(message)
        self.traceback_text = traceback_text


__all__ = [
    "DefinitionError",
    "MinigunError",
    "PipelineError",
    "RoutingError",
    "UnsupportedStrategy",
    "WorkerError",
]
