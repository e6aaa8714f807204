"""The live progress view of a run: ``run(progress=True)``, ``start(progress=True)`` and the
CLI's ``--progress`` (API.md section 6).

A thread of its own reads the runtime's stats snapshot a few times a second (the workers
only bump atomic counters, so watching costs them nothing) and draws one line per stage:
items in and out, the rate since the last look, errors, how many workers are busy, how
full the input queue is; above them the elapsed time and, when every producer's total is
known, a bar and the estimated time left.

On a terminal with ``rich`` installed (the ``[hud]`` extra) the view redraws in place.
Otherwise it prints plain blocks of lines to stderr: the first within a second of the
start, then every few seconds, and a last one when the run ends.
"""

# No ``from __future__ import annotations`` here: the fields of this module's typed records
# reach ``typing`` as types rather than as strings, each of which it would compile when the
# class is made (20 to 70 µs a field, paid by every ``import minigun``).

import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, NamedTuple

from .stats import StageStats

#: Seconds between redraws on a terminal, and before the first plain block and between
#: plain blocks (API.md: the first within 1 s, then at least every 5 s).
RICH_EVERY = 0.5
PLAIN_FIRST = 0.5
PLAIN_EVERY = 5.0


class StageLine(NamedTuple):
    """What the view shows for one stage at one moment."""

    name: str
    items_in: int | None  # None for producers, which take no items
    items_out: int
    rate: float
    errors: int
    busy: float | None  # workers busy on average since the last look
    workers: int
    queued: int | None
    queue_size: int | None

    def cells(self) -> tuple[str, ...]:
        return (
            self.name,
            "-" if self.items_in is None else f"{self.items_in:,}",
            f"{self.items_out:,}",
            f"{self.rate:,.0f}/s",
            f"{self.errors:,}",
            "-" if self.busy is None else f"{self.busy:.1f}/{self.workers}",
            _queue_text(self.queued, self.queue_size),
        )


HEADER = ("stage", "in", "out", "rate", "errors", "busy", "queue")


class Frame(NamedTuple):
    """One look at the run: elapsed seconds, done fraction (None: totals unknown), the
    estimated seconds left (None: unknown) and one line per stage."""

    elapsed: float
    done: float | None
    eta: float | None
    stages: tuple[StageLine, ...]

    def heading(self) -> str:
        text = f"minigun: {_clock(self.elapsed)} elapsed"
        if self.done is not None:
            text += f", {self.done * 100:.0f}% done"
            if self.eta is not None:
                text += f", about {_clock(self.eta)} left"
        return text

    def plain(self) -> str:
        rows = [HEADER] + [line.cells() for line in self.stages]
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        lines = [self.heading()]
        for row in rows:
            cells = [row[0].ljust(widths[0])]
            cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            lines.append("  " + "  ".join(cells).rstrip())
        return "\n".join(lines)


class Watcher:
    """Turns successive stats snapshots into frames (rates and busy workers are measured
    between two looks)."""

    def __init__(self, totals: Mapping[str, int]) -> None:
        self.totals = dict(totals)
        self.started = time.perf_counter()
        self._last: tuple[float, dict[str, StageStats]] | None = None

    def frame(self, stats: Mapping[str, StageStats], final: bool = False) -> Frame:
        """The frame for ``stats``; rates since the last frame, or (``final``) since the
        start."""
        now = time.perf_counter()
        last_at, last = self._last if self._last is not None and not final else (self.started, {})
        span = max(now - last_at, 1e-9)
        lines = []
        for name, s in stats.items():
            before = last.get(name)
            moved = s.items_out if s.is_producer else s.items_in
            moved_before = (
                0 if before is None else (before.items_out if s.is_producer else before.items_in)
            )
            busy_before = 0.0 if before is None else before.busy_seconds
            lines.append(
                StageLine(
                    name=name,
                    items_in=None if s.is_producer else s.items_in,
                    items_out=s.items_out,
                    rate=(moved - moved_before) / span,
                    errors=s.errors,
                    busy=None
                    if s.busy_fraction is None
                    else min(float(s.workers), (s.busy_seconds - busy_before) / span),
                    workers=s.workers,
                    queued=None if s.is_producer else s.queued,
                    queue_size=s.queue_size,
                )
            )
        self._last = (now, dict(stats))
        elapsed = now - self.started
        done = eta = None
        producers = [n for n, s in stats.items() if s.is_producer]
        if producers and all(n in self.totals for n in producers):
            total = sum(self.totals[n] for n in producers)
            emitted = sum(stats[n].items_out for n in producers)
            done = 1.0 if total == 0 else min(1.0, emitted / total)
            if 0 < done < 1:
                eta = elapsed * (1 - done) / done
        return Frame(elapsed, done, eta, tuple(lines))


class ProgressView:
    """Draws a run's progress from a background thread until :meth:`stop`."""

    def __init__(
        self,
        snapshot: Callable[[], Mapping[str, StageStats]],
        totals: Callable[[], Mapping[str, int]],
        stream: IO[str] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._totals = totals
        self._stream = stream if stream is not None else sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watcher = Watcher({})
        self._live: Any = None

    def start(self) -> "ProgressView":
        self._watcher = Watcher(self._totals())
        if _is_terminal(self._stream) and _rich_available():
            self._live = _RichLive(self._stream)
        self._thread = threading.Thread(target=self._loop, name="minigun-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Draw the last frame and end the view (idempotent)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        frame = self._frame(final=True)
        if self._live is not None:
            self._live.stop(frame)
        else:
            self._write(frame)

    def _frame(self, final: bool = False) -> Frame:
        self._watcher.totals.update(self._totals())
        return self._watcher.frame(self._snapshot(), final)

    def _loop(self) -> None:
        if self._live is not None:
            while not self._stop.wait(RICH_EVERY):
                self._live.update(self._frame())
            return
        wait = PLAIN_FIRST
        while not self._stop.wait(wait):
            self._write(self._frame())
            wait = PLAIN_EVERY

    def _write(self, frame: Frame) -> None:
        try:
            self._stream.write(frame.plain() + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed: the view is a courtesy, never the run's failure


class _RichLive:
    """The in-place view, drawn with rich."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console  # noqa: PLC0415 - rich is an optional extra
        from rich.live import Live  # noqa: PLC0415

        self._live = Live(console=Console(file=stream), auto_refresh=False, transient=False)
        self._live.start()

    def update(self, frame: Frame) -> None:
        self._live.update(_rich_renderable(frame), refresh=True)

    def stop(self, frame: Frame) -> None:
        self.update(frame)
        self._live.stop()


def _rich_renderable(frame: Frame) -> Any:
    from rich.console import Group  # noqa: PLC0415
    from rich.progress_bar import ProgressBar  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(box=None, pad_edge=False, header_style="bold")
    for k, title in enumerate(HEADER):
        table.add_column(title, justify="left" if k == 0 else "right")
    for line in frame.stages:
        table.add_row(*line.cells())
    head = Table.grid(padding=(0, 1))
    head.add_row(frame.heading())
    if frame.done is not None:
        head.add_row(ProgressBar(total=1.0, completed=frame.done, width=40))
    return Group(head, table)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _rich_available() -> bool:
    try:
        import rich.live  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _queue_text(queued: int | None, size: int | None) -> str:
    if queued is None:
        return "-"
    if size is None:
        return f"{queued:,}"
    return f"{queued:,}/{size:,}"


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


__all__ = ["Frame", "ProgressView", "StageLine", "Watcher"]
