"""A suite report (the JSON of ``python -m benchmarks --json``) as Markdown tables.

``python -m benchmarks.report out.json`` prints them: what docs/performance.md shows.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _value(workload: dict[str, Any], result: dict[str, Any]) -> str:
    value = result["value"]
    if workload["unit"] == "items/s":
        return f"{value / 1e6:.2f}M/s" if value >= 1e5 else f"{value / 1e3:.1f}k/s"
    if workload["unit"] == "ms":
        return f"{value:.3f} ms" if value >= 0.01 else f"{value * 1000:.2f} µs"
    return f"{value:.3f} s"


def _mb(value: float | None) -> str:
    return f"{value:.1f}" if value else "-"


def workload_table(workload: dict[str, Any]) -> list[str]:
    results = workload["results"]
    subjects = [s for s in workload["subjects"] if results[s]["status"] == "ok"]
    ideal = workload["ideal_seconds"] is not None
    header = ["implementation", "result"] + (["x ideal"] if ideal else [])
    header += [
        f"{s.removeprefix('minigun ') if len(subjects) > 1 else 'minigun'} speed-up"
        for s in subjects
    ]
    header += ["peak RSS MB", "children PSS MB"]
    shown = ", ".join(
        f"{key}={value:,}" if isinstance(value, int) else f"{key}={value}"
        for key, value in workload["params"].items()
        if not key.startswith("_")
    )
    lines = [
        f"**{workload['key']}**: {workload['title']} ({shown})",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for name, result in results.items():
        if result["best_seconds"] is None:
            cells = [name, result["status"]] + [""] * (len(header) - 2)
        else:
            cells = [name, _value(workload, result)]
            if ideal:
                cells.append(f"{result['x_ideal']:.2f}" if result["x_ideal"] else "-")
            for subject in subjects:
                ratio = result["speed_up"].get(subject)
                cells.append("-" if subject == name or ratio is None else f"{ratio:.2f}x")
            cells += [_mb(result["max_rss_mb"]), _mb(result["children_pss_mb"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.extend(["", *(f"{note}." for note in workload["notes"])] if workload["notes"] else [])
    return lines


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    load = machine.get("load_average")
    lines = [
        f"Machine: {machine['cpus']} CPU(s), {machine['cpu_model']}"
        + (f", load average {load[0]:.2f} at the start" if load else "")
        + f". Python {machine['python']} (GIL {machine['gil']})."
        f" Command: `{' '.join(report['command'])}`, best of {report['repeats']},"
        f" {report['started']} to {report.get('finished', '?')}.",
    ]
    for workload in report["workloads"]:
        lines += ["", *workload_table(workload)]
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> int:
    for path in paths:
        with open(path) as source:
            sys.stdout.write(markdown(json.load(source)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
