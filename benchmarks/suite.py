"""The benchmark suite's command: ``python -m benchmarks [--quick] [--only W1,W4] [--json F]``.

See docs/performance.md for the workloads, the baselines and how to read the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks import (
    environment,
    memory,
    w1_overhead,
    w2_async,
    w2_threads,
    w3_cpu,
    w4_batching,
    w5_one_item,
)
from benchmarks.report import markdown
from benchmarks.runner import run_workload
from benchmarks.workload import OK, Measurement, Params, Workload

WORKLOADS: tuple[Workload, ...] = (
    *w1_overhead.WORKLOADS,
    *w2_threads.WORKLOADS,
    *w2_async.WORKLOADS,
    *w3_cpu.WORKLOADS,
    *w4_batching.WORKLOADS,
    *w5_one_item.WORKLOADS,
    *memory.WORKLOADS,
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    keys = ", ".join(workload.key for workload in WORKLOADS)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="minigun against its baselines and peers, each run in a fresh process.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny inputs, one repeat (checks that it runs)"
    )
    parser.add_argument("--only", help=f"comma-separated workloads ({keys})")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown here")
    parser.add_argument(
        "--repeat", type=int, help="runs of each implementation, best kept (default 3; 1 quick)"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds one run may take (default 120; 30 quick)"
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="leave out the peer libraries (pypeln, ...)"
    )
    parser.add_argument(
        "--no-venv",
        action="store_true",
        help="run with this interpreter as it is, not in the suite's own environment",
    )
    parser.add_argument(
        "--no-build", action="store_true", help="do not rebuild minigun into the environment"
    )
    args = parser.parse_args(argv)
    if args.only:
        wanted = {key.strip().upper() for key in args.only.split(",") if key.strip()}
        unknown = wanted - {workload.key.upper() for workload in WORKLOADS}
        if unknown:
            parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}; known: {keys}")
        args.only = wanted
    return args


def machine() -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                "",
            )
    except OSError:
        pass
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    return {
        "cpus": cpus,
        "cpu_model": model,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "gil": "on" if gil else "off",
        "executable": sys.executable,
        "platform": platform.platform(),
    }


def speed_ups(
    workload: Workload, results: Mapping[str, Measurement]
) -> dict[str, dict[str, float]]:
    """For each baseline: how many times faster each minigun implementation did the work."""
    ratios: dict[str, dict[str, float]] = {}
    for name, measurement in results.items():
        if measurement.best is None:
            continue
        ratios[name] = {}
        for subject in workload.subjects:
            best = results[subject].best
            if best is not None and best > 0:
                ratios[name][subject] = measurement.best / best
    return ratios


def best_times(results: Mapping[str, Measurement]) -> dict[str, float]:
    return {name: m.best for name, m in results.items() if m.best is not None}


def ideal_seconds(
    workload: Workload, params: Params, results: Mapping[str, Measurement]
) -> float | None:
    if workload.ideal_seconds is None:
        return None
    return workload.ideal_seconds(params, best_times(results))


def value_text(workload: Workload, params: Params, seconds: float) -> str:
    count = workload.count(params)
    if workload.unit == "items/s":
        rate = count / seconds
        return f"{rate / 1e6:.2f}M items/s" if rate >= 1e5 else f"{rate / 1e3:.1f}k items/s"
    if workload.unit == "ms":
        ms = seconds * 1000 / count
        return f"{ms:.3f} ms" if ms >= 0.01 else f"{ms * 1000:.2f} µs"
    return f"{seconds:.3f} s"


def render(
    workload: Workload,
    params: Params,
    results: Mapping[str, Measurement],
    repeats: int,
) -> list[str]:
    shown = ", ".join(
        f"{key}={value:,}" if isinstance(value, int) else f"{key}={value}"
        for key, value in params.items()
        if not key.startswith("_")  # what the parent worked out for the runs' own use
    )
    lines = [
        f"{workload.key}  {workload.title}",
        f"    {shown}; best of {repeats}, each run in a fresh process",
    ]
    if workload.subjects:
        lines.append("    speed-up: how many times faster minigun did the work than that row")
    ratios = speed_ups(workload, results)
    ideal = ideal_seconds(workload, params, results)
    # A minigun implementation that did not run (unavailable here) gets no column.
    subjects = [subject for subject in workload.subjects if results[subject].best is not None]
    columns = [
        (
            subject,
            f"{subject.removeprefix('minigun ') if len(subjects) > 1 else 'minigun'} speed-up",
        )
        for subject in subjects
    ]
    widths = [max(len(title) + 2, 12) for _, title in columns]
    header = f"  {'implementation':<30}{'result':>16}"
    if ideal is not None:
        header += f"{'x ideal':>9}"
    for (_, title), width in zip(columns, widths, strict=True):
        header += f"{title:>{width}}"
    header += f"{'peak RSS':>11}{'children PSS':>14}"
    lines.append(header)
    for impl in workload.impls:
        measurement = results[impl.name]
        impl_params = workload.params_for(params, impl.name)
        if measurement.best is None:
            detail = f"  ({measurement.detail})" if measurement.detail else ""
            lines.append(f"  {impl.name:<30}{measurement.status:>16}{detail}")
            continue
        row = f"  {impl.name:<30}{value_text(workload, impl_params, measurement.best):>16}"
        if ideal is not None:
            row += f"{measurement.best / ideal:>9.2f}"
        for (subject, _), width in zip(columns, widths, strict=True):
            ratio = ratios[impl.name].get(subject)
            cell = "-" if ratio is None or subject == impl.name else f"{ratio:.2f}x"
            row += f"{cell:>{width}}"
        rss = f"{measurement.max_rss_mb:.1f} MB" if measurement.max_rss_mb else "-"
        pss = f"{measurement.children_pss_mb:.1f} MB" if measurement.children_pss_mb else "-"
        row += f"{rss:>11}{pss:>14}"
        if measurement.status != OK:
            row += f"  ({measurement.status}: {measurement.detail})"
        lines.append(row)
    if workload.notes is not None:
        lines.extend(f"    {note}" for note in workload.notes(params, results))
    return lines


def as_json(
    workload: Workload, params: Params, results: Mapping[str, Measurement]
) -> dict[str, Any]:
    ratios = speed_ups(workload, results)
    ideal = ideal_seconds(workload, params, results)
    rows: dict[str, Any] = {}
    for impl in workload.impls:
        measurement = results[impl.name]
        impl_params = workload.params_for(params, impl.name)
        best = measurement.best
        value = None
        if best is not None:
            count = workload.count(impl_params)
            value = count / best if workload.unit == "items/s" else best * 1000 / count
            if workload.unit == "s":
                value = best
        rows[impl.name] = {
            "peer": impl.requires,  # the peer library's import name; null: minigun or stdlib
            "status": measurement.status,
            "detail": measurement.detail,
            "runs_seconds": measurement.runs,
            "best_seconds": best,
            "value": value,
            "x_ideal": best / ideal if best is not None and ideal else None,
            "speed_up": ratios.get(impl.name, {}),
            "max_rss_mb": measurement.max_rss_mb,
            "children_pss_mb": measurement.children_pss_mb,
            "params": impl_params,
        }
    return {
        "key": workload.key,
        "title": workload.title,
        # Each result's "value": items/s, ms per run ("ms") or wall seconds ("s").
        "unit": workload.unit,
        "subjects": list(workload.subjects),
        "params": params,
        "ideal_seconds": ideal,
        "results": rows,
        "notes": workload.notes(params, results) if workload.notes else [],
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.no_venv and not environment.in_bench_venv():
        python = environment.ensure(build=not args.no_build)
        # Run again inside the environment (peers installed, minigun built from this tree);
        # there in_bench_venv() is true, so it does not come back here.
        os.execv(python, [str(python), "-m", "benchmarks", *argv])
    repeats = args.repeat or (1 if args.quick else 3)
    timeout = args.timeout or (30.0 if args.quick else 120.0)
    chosen = [w for w in WORKLOADS if not args.only or w.key.upper() in args.only]
    info = machine()
    print(
        f"minigun benchmarks: Python {info['python']} (GIL {info['gil']}), {info['cpus']} CPU(s)"
        f" {info['cpu_model']}, load average {info['load_average'][0]:.2f} at the start"
        + (" [--quick: tiny inputs, the numbers mean nothing]" if args.quick else ""),
        flush=True,
    )
    report: dict[str, Any] = {
        "command": ["python", "-m", "benchmarks", *argv],
        "quick": args.quick,
        "repeats": repeats,
        "timeout_seconds": timeout,
        "machine": info,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workloads": [],
    }
    tty = sys.stderr.isatty()

    def progress(message: str) -> None:
        if tty:
            print(f"\r\033[K  running {message}", end="", file=sys.stderr, flush=True)

    for workload in chosen:
        params = dict(workload.quick if args.quick else workload.full)
        if workload.prepare is not None:
            params = workload.prepare(params)
        results = run_workload(workload, params, repeats, timeout, not args.no_peers, progress)
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        print()
        print("\n".join(render(workload, params, results, repeats)), flush=True)
        report["workloads"].append(as_json(workload, params, results))
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(report))
    return 0
