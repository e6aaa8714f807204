"""What a run reports: :class:`StageStats` per stage and the :class:`RunResult` of a run,
with its text summary and its JSON-ready :meth:`RunResult.to_dict` (API.md section 6).

The counters come from the Rust runtime (``src/stats.rs``); this module only names and
formats them. The same formatting serves the live progress view (``progress.py``).
"""

# No ``from __future__ import annotations`` here: the fields of this module's typed records
# reach ``typing`` as types rather than as strings, each of which it would compile when the
# class is made (20 to 70 µs a field, paid by every ``import minigun``).

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .kinds import PRODUCER

if TYPE_CHECKING:
    import math
else:
    from .lazy_import import math


class StageInfo(NamedTuple):
    """What the plan of a run says about one stage (the runtime counts only items)."""

    kind: str
    strategy: str
    workers: int
    #: The runtime's worker threads for the stage (what busy time is divided by).
    threads: int
    queue_size: int | None
    #: False for a stage that only passes items on (a body-less accumulator).
    runs_code: bool


class StageStats(NamedTuple):
    """Counters of one stage. Latencies are in seconds, throughput in items per second.

    ``busy_fraction`` is the share of its workers' time the stage spent on its items (time
    waiting for input, or for room in a full downstream queue, is not busy): the stage
    closest to 1.0 is the bottleneck. It is ``None`` for a stage that runs no user code.

    An immutable record (a named tuple): ``stats._asdict()`` gives its fields as a dict,
    ``stats._replace(errors=0)`` a copy with some changed.
    """

    items_in: int = 0
    items_out: int = 0
    errors: int = 0
    retries: int = 0
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    throughput: float = 0.0
    #: Items waiting in the stage's input queue (live stats) and chunks it received.
    queued: int = 0
    chunks_in: int = 0
    #: The stage's kind ("producer", "processor", "accumulator"), where its work runs and
    #: with how many workers (threads, processes or coroutines, as the strategy counts).
    kind: str = ""
    strategy: str = ""
    workers: int = 0
    #: The capacity of the stage's input queue in items (None: unbounded or no input).
    queue_size: int | None = None
    #: Seconds from the stage's first item to its end (to now, while it runs), and the
    #: seconds its workers were busy, summed over workers.
    active_seconds: float = 0.0
    busy_seconds: float = 0.0
    busy_fraction: float | None = None

    @classmethod
    def from_runtime(cls, raw: dict[str, Any], info: StageInfo | None = None) -> "StageStats":
        values = {k: raw[k] for k in _FIELDS if k in raw}
        if info is not None:
            values.update(
                kind=info.kind,
                strategy=info.strategy,
                workers=info.workers,
                # An inline stage on its sender's thread has none (src/inline.rs).
                queue_size=info.queue_size if raw.get("has_input_queue", True) else None,
            )
            active, busy = raw.get("active_seconds", 0.0), raw.get("busy_seconds", 0.0)
            if not info.runs_code:
                values["busy_fraction"] = None
            elif active > 0:
                values["busy_fraction"] = min(1.0, busy / (active * info.threads))
            else:
                values["busy_fraction"] = 0.0
        return cls(**values)

    @property
    def is_producer(self) -> bool:
        return self.kind == PRODUCER


_FIELDS = StageStats._fields


class RunResult:
    """What a run did: ``status`` ("ok", "failed" or "cancelled"), ``duration`` in seconds,
    ``stats`` per stage (nested stages by dotted path) and the ``error`` a failed run
    raised."""

    __slots__ = ("status", "duration", "stats", "error")

    def __init__(
        self,
        status: str,
        duration: float,
        stats: dict[str, StageStats] | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.status = status
        self.duration = duration
        self.stats: dict[str, StageStats] = {} if stats is None else stats
        self.error = error

    def __repr__(self) -> str:
        return (
            f"RunResult(status={self.status!r}, duration={self.duration!r}, "
            f"stats={self.stats!r}, error={self.error!r})"
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is not RunResult:
            return NotImplemented
        return (self.status, self.duration, self.stats, self.error) == (
            other.status,
            other.duration,
            other.stats,
            other.error,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def bottleneck(self) -> str | None:
        """The stage whose workers were busiest (the highest busy fraction), or None when
        no stage ran user code for a measurable time."""
        return bottleneck(self.stats)

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON-serialisable data: status, duration, the bottleneck, the error
        (if any) and every stage's counters, strategy and workers."""
        return {
            "status": self.status,
            "duration": _finite(self.duration),
            "bottleneck": self.bottleneck,
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            "stages": {
                name: {k: _finite(v) for k, v in s._asdict().items()}
                for name, s in self.stats.items()
            },
        }

    def summary(self) -> str:
        """An aligned text table of the per-stage counters, and the bottleneck."""
        head = (
            "stage",
            "strategy",
            "in",
            "out",
            "errors",
            "retries",
            "p50",
            "p99",
            "items/s",
            "busy",
        )
        rows = [head]
        for name, s in self.stats.items():
            rows.append(
                (
                    name,
                    f"{s.strategy} x{s.workers}" if s.strategy else "-",
                    "-" if s.is_producer else f"{s.items_in:,}",
                    f"{s.items_out:,}",
                    f"{s.errors:,}",
                    f"{s.retries:,}",
                    duration_text(s.latency_p50),
                    duration_text(s.latency_p99),
                    f"{s.throughput:,.0f}" if s.throughput > 0 else "-",
                    percent_text(s.busy_fraction),
                )
            )
        lines = [f"run {self.status} in {self.duration:.3f}s"]
        lines += table(rows)
        slowest = self.bottleneck
        if slowest is not None:
            s = self.stats[slowest]
            lines.append(
                f"bottleneck: {slowest} (busy {percent_text(s.busy_fraction)} of "
                f"its time with {s.workers} {_worker_word(s)})"
            )
        return "\n".join(lines)


def bottleneck(stats: dict[str, StageStats]) -> str | None:
    candidates = [
        (s.busy_fraction, name)
        for name, s in stats.items()
        if s.busy_fraction is not None and s.busy_seconds > 0
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows as aligned lines: the first column left-aligned, the others right-aligned, a
    rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def duration_text(seconds: float) -> str:
    """A latency for people: ``-`` when none was measured, sub-microsecond ones as such."""
    if seconds <= 0:
        return "-"
    if seconds < 1e-5:
        return f"{seconds * 1e6:.1f}µs"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def percent_text(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def _worker_word(s: StageStats) -> str:
    if s.strategy == "async":
        return "coroutine" + ("s" if s.workers != 1 else "")
    if s.strategy in ("fork_ipc", "spawn_fork"):
        return "process" + ("es" if s.workers != 1 else "")
    return "thread" + ("s" if s.workers != 1 else "")


def _finite(value: Any) -> Any:
    # JSON has no inf or NaN.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
