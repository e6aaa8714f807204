"""W3's hand-offs: how long a CPU waits between one batch's end and the next batch's start.

``python -m benchmarks.handoffs [--rounds N] [--quick] [--json PATH]``

A pool hands its worker the next batch over a pipe. spawn_fork, and a hand-written
``os.fork()`` per batch, fork a fresh child for it, and the child that ran the last batch
exits. That costs a few milliseconds per batch: W3's whole-run times cannot separate it
from the machine's drift between rounds, so this measures it directly.

Each implementation runs W3 (the suite's parameters, its loop length calibrated once here)
in a fresh process, alternating round by round, with ``crunch`` replaced by one that
records when each batch starts and ends (``perf_counter``: the system's monotonic clock,
the same in every process). With at most one batch per CPU running, the k-th batch to
start after the first ``cpus`` can only start once k batches have ended, so a hand-off is
the time from the k-th end to the (k + cpus)-th start: what the freed CPU spent on
reaping, forking, starting the next worker and handing it its batch. The report gives the
median hand-off of each run (the median and range over the rounds), their sum over the
run, and the time from the run's start to its first batch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import w3_cpu
from benchmarks.runner import ROOT, child_env, kill_group
from benchmarks.workload import Params

#: Where a measured process's batches append ``start end`` lines (set in its environment).
LOG_ENV = "MINIGUN_HANDOFF_LOG"


def recording_crunch(batch: list[w3_cpu.Item]) -> int:
    """``crunch``, recording when it started and ended (one append per batch, after the
    clock stopped)."""
    started = time.perf_counter()
    subtotal = sum(w3_cpu.work(item) for item in batch)
    ended = time.perf_counter()
    log = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(log, f"{started!r} {ended!r}\n".encode())
    finally:
        os.close(log)
    return subtotal


def pool_per_batch(params: Params) -> int:
    """``multiprocessing.Pool`` with a task per batch: W3's chunks of 20 items, handed to a
    worker as one task, so that a task is a batch as in the other rows."""
    with multiprocessing.get_context("fork").Pool(params["cpus"]) as pool:
        return sum(pool.imap(w3_cpu.crunch, w3_cpu.batches(params)))


IMPLEMENTATIONS: dict[str, Callable[[Params], int]] = {
    "multiprocessing.Pool, a task per batch": pool_per_batch,
    "os.fork per batch": w3_cpu.fork_per_batch,
    "minigun spawn_fork": w3_cpu.minigun("spawn_fork").run,
    "minigun fork_ipc": w3_cpu.minigun("fork_ipc").run,
}


def handoffs(spans: list[tuple[float, float]], cpus: int) -> list[float]:
    """The hand-offs (seconds) of a run whose batches ran over ``spans``, at most ``cpus``
    at a time: the k-th end to the (k + cpus)-th start."""
    starts = sorted(start for start, _ in spans)[cpus:]
    ends = sorted(end for _, end in spans)
    return [start - end for start, end in zip(starts, ends, strict=False)]


def measure_one(name: str, params: Params, log: Path) -> dict[str, Any]:
    """In the measured process: run ``name`` with the recording ``crunch``."""
    w3_cpu.crunch = recording_crunch  # what every implementation above calls per batch
    if name.startswith("minigun"):
        import minigun  # noqa: F401 - imported before the clock, as the suite does

    began = time.perf_counter()
    total = IMPLEMENTATIONS[name](params)
    finished = time.perf_counter()
    if total != params["_expected"]:
        raise SystemExit(f"{name} computed {total}, expected {params['_expected']}")
    spans = [(float(start), float(end)) for start, end in (line.split() for line in log.open())]
    gaps = handoffs(spans, params["cpus"])
    return {
        "batches": len(spans),
        "median_ms": statistics.median(gaps) * 1e3 if gaps else 0.0,
        "sum_ms": sum(gaps) * 1e3,
        "first_batch_ms": (min(start for start, _ in spans) - began) * 1e3,
        "wall_s": finished - began,
    }


def run_fresh(name: str, params: Params, timeout: float) -> dict[str, Any]:
    """One measurement of ``name`` in a fresh process (killed with its children after
    ``timeout`` seconds)."""
    command = [sys.executable, "-m", "benchmarks.handoffs", "--one", name, json.dumps(params)]
    with tempfile.TemporaryDirectory(prefix="minigun-handoffs-") as scratch:
        env = {**child_env(), LOG_ENV: str(Path(scratch) / "spans.log")}
        child = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, start_new_session=True, text=True
        )
        try:
            out, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{name}: no result after {timeout:g} s") from None
        finally:
            kill_group(child.pid)  # and whatever it left (a pool's stray worker)
            child.wait()
    if child.returncode != 0:
        raise SystemExit(f"{name}: exit {child.returncode}")
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.handoffs",
        description="W3's hand-offs between batches, per implementation, in fresh processes.",
    )
    parser.add_argument("--rounds", type=int, help="runs of each implementation (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one round")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one run may take")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "PARAMS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.one:
        name, params_json = args.one
        print(json.dumps(measure_one(name, json.loads(params_json), Path(os.environ[LOG_ENV]))))
        return 0
    workload = w3_cpu.WORKLOADS[0]
    params = w3_cpu.calibrate(dict(workload.quick if args.quick else workload.full))
    rounds = args.rounds or (1 if args.quick else 5)
    names = list(IMPLEMENTATIONS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(run_fresh(name, params, args.timeout))
    print(
        f"W3 hand-offs: {params['n']} items in batches of {params['batch']}, {params['cpus']}"
        f" worker(s), ~{params['ms']:g} ms an item; {rounds} round(s), each run in a fresh"
        " process. A hand-off: a batch's end to the next batch's start on the freed CPU (ms)."
    )
    print(
        f"  {'implementation':40} {'median':>8} {'range over the rounds':>22}"
        f" {'summed over a run':>18} {'to the first batch':>19}"
    )
    for name in names:
        medians = sorted(run["median_ms"] for run in runs[name])
        summed = statistics.median(run["sum_ms"] for run in runs[name])
        first = statistics.median(run["first_batch_ms"] for run in runs[name])
        spread = f"{medians[0]:.2f} to {medians[-1]:.2f}"
        print(
            f"  {name:40} {statistics.median(medians):8.2f} {spread:>22}"
            f" {summed:18.1f} {first:19.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
