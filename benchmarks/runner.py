"""The measuring machinery every workload shares: fresh process, timeout, best-of-N, RSS.

:func:`run_workload` measures every implementation of a workload in a fresh process
(``python -m benchmarks.child``, which times the run itself, so interpreter start-up and
imports are not in the time) with a timeout, alternating between the implementations round
by round, and keeps the best of the repeats; a run that hangs or fails is recorded as such,
never dropped. The main process's peak RSS is the child's own (``VmHWM``). For
implementations that start processes, this side samples the proportional set size (PSS,
from ``/proc/<pid>/smaps_rollup``) of every descendant of the child while it runs and keeps
the peak of their sum: PSS splits the copy-on-write pages forked children share instead of
counting them once per child.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.workload import (
    EXIT_NOT_INSTALLED,
    EXIT_UNAVAILABLE,
    FAILED,
    NOT_INSTALLED,
    OK,
    SKIPPED,
    TIMEOUT,
    UNAVAILABLE,
    Impl,
    Measurement,
    Params,
    Workload,
)

ROOT = Path(__file__).resolve().parent.parent

PSS_SAMPLE_SECONDS = 0.05


def peer_installed(impl: Impl) -> bool:
    return impl.requires is None or importlib.util.find_spec(impl.requires) is not None


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process (no /proc/<pid>/task/<tid>/children here)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # The command name (field 2) may hold spaces: fields after its ')' are fixed.
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    parents = _parent_pids()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def child_env() -> dict[str, str]:
    """The environment of a measured process: this one's, with the repository on the path
    (the children import this package; forkserver and spawn pools re-import it too)."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def measure_once(
    workload: Workload, impl: Impl, params: Params, timeout: float
) -> tuple[str, float | None, str, float | None, float | None]:
    """One fresh-process run: (status, seconds, detail, max RSS MB, children's peak PSS MB)."""
    with tempfile.TemporaryDirectory(prefix="minigun-bench-") as scratch:
        result_path = Path(scratch) / "result.json"
        command = [
            sys.executable,
            "-m",
            "benchmarks.child",
            workload.module,
            workload.key,
            impl.name,
            json.dumps(params),
            str(result_path),
        ]
        # stderr goes to a file, not a pipe: a chatty run must not block on a full pipe
        # while this side samples PSS instead of reading.
        errors_path = Path(scratch) / "stderr.txt"
        with open(errors_path, "w") as errors:
            child = subprocess.Popen(
                command,
                cwd=ROOT,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,  # its own process group: killed whole, below
            )
        deadline = time.monotonic() + timeout
        peak_pss = 0
        try:
            if impl.processes:
                while child.poll() is None and time.monotonic() < deadline:
                    peak_pss = max(peak_pss, sum(pss_kb(pid) for pid in descendants(child.pid)))
                    time.sleep(PSS_SAMPLE_SECONDS)
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_group(child.pid)
            child.wait()
            return TIMEOUT, None, f"no result after {timeout:g} s", None, None
        # Whatever the run left behind (a peer's stray worker) must not load the next one.
        kill_group(child.pid)
        stderr = errors_path.read_text(errors="replace")
        pss_mb = peak_pss / 1024 if impl.processes else None
        if child.returncode == EXIT_NOT_INSTALLED:
            return NOT_INSTALLED, None, _last_line(stderr), None, None
        if child.returncode == EXIT_UNAVAILABLE:
            return UNAVAILABLE, None, _last_line(stderr), None, None
        if child.returncode != 0 or not result_path.exists():
            return FAILED, None, f"exit {child.returncode}: {_last_line(stderr)}", None, pss_mb
        result = json.loads(result_path.read_text())
        return OK, result["seconds"], "", result["max_rss_kb"] / 1024, pss_mb


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else ""


def run_workload(
    workload: Workload,
    params: Params,
    repeats: int,
    timeout: float,
    peers: bool,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Measurement]:
    """Best-of-``repeats`` of every implementation, alternating between them round by round.

    An implementation that failed or timed out is not run again (a hang would cost the
    timeout every round); a peer that is not installed, or left out, is never started.
    """
    measurements = {impl.name: Measurement() for impl in workload.impls}
    for impl in workload.impls:
        if impl.requires is not None and not peers:
            measurements[impl.name].status = SKIPPED
        elif not peer_installed(impl):
            measurements[impl.name].status = NOT_INSTALLED
            measurements[impl.name].detail = f"no module {impl.requires!r}"
    for round_index in range(repeats):
        # Rotate the order each round so no implementation always runs first (or last).
        shift = round_index % len(workload.impls)
        for impl in workload.impls[shift:] + workload.impls[:shift]:
            measurement = measurements[impl.name]
            if measurement.status != OK:
                continue
            if progress is not None:
                progress(f"{workload.key} {impl.name} ({round_index + 1}/{repeats})")
            status, seconds, detail, rss, pss = measure_once(
                workload, impl, workload.params_for(params, impl.name), timeout
            )
            if status != OK:
                measurement.status, measurement.detail = status, detail
                continue
            assert seconds is not None
            measurement.runs.append(seconds)
            if rss is not None:
                measurement.max_rss_mb = max(measurement.max_rss_mb or 0.0, rss)
            if pss is not None:
                measurement.children_pss_mb = max(measurement.children_pss_mb or 0.0, pss)
    return measurements
