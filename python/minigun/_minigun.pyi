"""Type stub of the Rust runtime extension (src/)."""

from collections.abc import Callable
from typing import Any, final

from minigun.native import StageSpec

__all__ = [
    "Runtime",
    "emit",
    "current_run_id",
    "MAX_CHUNK",
    "reap",
    "exited",
    "terminate",
    "fork_gate_close",
    "fork_gate_open",
    "read_frame",
    "write_frame",
]

MAX_CHUNK: int

def emit(value: Any, to: str | None = None) -> None:
    """Send ``value`` from the stage worker running on this thread."""

def current_run_id() -> int | None:
    """The ``Runtime.run_id`` of the stage worker running on this thread, if any."""

def reap(pid: int, timeout: float | None = None) -> int | None:
    """Wait (without the GIL) up to ``timeout`` s for child ``pid``; its raw wait status,
    or None if it is still running."""

def exited(pid: int) -> bool:
    """Whether child ``pid`` has ended (it is not reaped)."""

def terminate(pid: int, grace: float = 1.0) -> int:
    """SIGTERM child ``pid``, SIGKILL it after ``grace`` s, reap it; its raw wait status."""

def read_frame(
    fd: int, tick: Callable[[], object] | None = None, pid: int | None = None
) -> bytearray | None:
    """Read one length-prefixed frame from ``fd`` without the GIL; None at a clean end."""

def write_frame(fd: int, data: bytes, tick: Callable[[], object] | None = None) -> None:
    """Write ``data`` as one length-prefixed frame to ``fd`` without the GIL."""

def fork_gate_close() -> None:
    """Wait (without the GIL) until no minigun thread is creating or deleting its thread
    state, and keep them from starting to until ``fork_gate_open()``."""

def fork_gate_open() -> None:
    """The parent's side of a fork is done."""

@final
class Runtime:
    """One pipeline run. ``specs`` are dicts describing each stage (see run.py)."""

    def __new__(cls, specs: list[StageSpec]) -> Runtime: ...
    def start(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def join(self) -> None: ...
    def cancel(self) -> None: ...
    def trigger(self, index: int) -> str: ...
    def stats(self) -> dict[str, dict[str, float]]: ...
    def failure(self) -> tuple[str, BaseException, Any] | None: ...
    @property
    def finished(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def run_id(self) -> int: ...
