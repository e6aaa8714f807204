"""The benchmark command runs every workload on tiny inputs and its output parses.

A regression check of the suite itself (benchmarks/, docs/performance.md), not of
minigun's speed: it asserts that every number is there and positive, never its size.
Peers are left out (they live in the suite's own environment), and the command runs with
this interpreter as it is (``--no-venv``), so it needs nothing installed beyond the tests'.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

WORKLOADS = [
    "W1",
    "W2",
    "W2-async",
    "W2-async-retry",
    "W3",
    "W4",
    "W5",
    "W5-elsewhere",
    "W5-import",
    "MEM",
]
# What this interpreter may lack: subinterpreters before 3.13.
MAY_BE_UNAVAILABLE = {"minigun interpreters", "minigun spawn_interpreter", "interpreter pool"}
# Ray is an engine minigun runs on, installed by the suite like the peers.
PEERS = ("pypeln", "mpire", "pyper", "streamable", "bytewax", "aiostream", "ray")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], str]:
    """(the printed tables, the JSON report, the Markdown tables) of one quick run."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-venv", "--no-peers"]
        + ["--json", str(out / "quick.json"), "--markdown", str(out / "quick.md")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "quick.json").read_text())
    return done.stdout, report, (out / "quick.md").read_text()


def test_every_workload_runs_minigun_and_its_baselines(
    quick_run: tuple[str, dict[str, Any], str],
) -> None:
    _, report, _ = quick_run
    assert [workload["key"] for workload in report["workloads"]] == WORKLOADS
    for workload in report["workloads"]:
        results = workload["results"]
        assert len(results) >= 2, workload["key"]
        for name, result in results.items():
            where = f"{workload['key']} {name}"
            if result["peer"] is not None:
                assert result["peer"] in PEERS, where
                assert result["status"] == "skipped", where
                continue
            if name in MAY_BE_UNAVAILABLE and result["status"] == "unavailable":
                assert result["detail"], where
                continue
            assert result["status"] == "ok", (where, result["detail"])
            assert result["best_seconds"] > 0, where
            assert result["value"] > 0, where
            assert len(result["runs_seconds"]) == 1, where
            assert result["max_rss_mb"] > 0, where


def test_ratios_and_ideal_are_given(quick_run: tuple[str, dict[str, Any], str]) -> None:
    _, report, _ = quick_run
    by_key = {workload["key"]: workload for workload in report["workloads"]}
    for workload in by_key.values():
        for subject in workload["subjects"]:
            if workload["results"][subject]["status"] != "ok":
                continue
            for name, result in workload["results"].items():
                if result["status"] == "ok" and name != subject:
                    assert result["speed_up"][subject] > 0, (workload["key"], name, subject)
    for key in ("W2", "W2-async", "W2-async-retry", "W3"):
        assert by_key[key]["ideal_seconds"] > 0, key
        minigun = by_key[key]["results"][by_key[key]["subjects"][0]]
        assert minigun["x_ideal"] > 0, key
    assert any("over a bare interpreter" in note for note in by_key["W5-import"]["notes"])
    round_by_round = [note for note in by_key["W3"]["notes"] if "round by round" in note]
    assert len(round_by_round) == 3 and all("over 1 round(s)" in n for n in round_by_round)
    assert any("spawn_fork against os.fork per batch" in n for n in round_by_round)
    assert len(by_key["MEM"]["notes"]) == 4


def test_the_table_names_every_workload_and_implementation(
    quick_run: tuple[str, dict[str, Any], str],
) -> None:
    text, report, _ = quick_run
    assert text.startswith("minigun benchmarks: Python ")
    lines = text.splitlines()
    for workload in report["workloads"]:
        assert any(line.startswith(f"{workload['key']}  ") for line in lines), workload["key"]
        for name in workload["results"]:
            assert any(line.strip().startswith(name) for line in lines), name


def test_the_markdown_tables_name_every_workload(
    quick_run: tuple[str, dict[str, Any], str],
) -> None:
    _, report, tables = quick_run
    assert tables.startswith("Machine: ")
    for workload in report["workloads"]:
        assert f"**{workload['key']}**: " in tables, workload["key"]
        for name in workload["results"]:
            assert f"| {name} | " in tables, name


def test_an_unknown_workload_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--no-venv", "--only", "W9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "unknown workload(s) W9" in done.stderr


FAULTY_WORKLOAD = """
import time

from benchmarks.workload import Impl, Workload


def fine(params):
    return params["n"]


def hangs(params):
    time.sleep(60)
    return params["n"]


def raises(params):
    raise RuntimeError("this baseline broke")


def miscounts(params):
    return params["n"] + 1


WORKLOADS = (
    Workload(
        key="FAULTY",
        module=__name__,
        title="implementations that hang, fail, miscount or are missing",
        impls=(
            Impl("fine", fine),
            Impl("hangs", hangs),
            Impl("raises", raises),
            Impl("miscounts", miscounts),
            Impl("missing peer", fine, requires="no_such_peer_library"),
        ),
        subjects=("fine",),
        full={"n": 10},
        quick={"n": 10},
        count=lambda params: params["n"],
        expected=lambda params: params["n"],
    ),
)
"""


def test_a_run_that_hangs_or_fails_is_recorded_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "faulty_workload.py").write_text(FAULTY_WORKLOAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the measured processes import it too
    faulty = importlib.import_module("faulty_workload")
    runner = importlib.import_module("benchmarks.runner")

    results = runner.run_workload(
        faulty.WORKLOADS[0], {"n": 10}, repeats=2, timeout=1.0, peers=True
    )

    assert results["fine"].status == "ok"
    assert len(results["fine"].runs) == 2
    assert results["hangs"].status == "timeout"
    assert results["hangs"].runs == []  # not run again after its timeout
    assert results["raises"].status == "failed"
    assert "this baseline broke" in results["raises"].detail
    assert results["miscounts"].status == "failed"
    assert "expected 10" in results["miscounts"].detail
    assert results["missing peer"].status == "not installed"


HANDOFF_IMPLEMENTATIONS = {
    "multiprocessing.Pool, a task per batch",
    "os.fork per batch",
    "minigun spawn_fork",
    "minigun fork_ipc",
}


def test_the_handoff_probe_times_every_implementation_between_its_batches(
    tmp_path: Path,
) -> None:
    out = tmp_path / "handoffs.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.handoffs", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    params = report["params"]
    batches = -(-params["n"] // params["batch"])
    assert set(report["runs"]) == HANDOFF_IMPLEMENTATIONS
    for name, runs in report["runs"].items():
        (run,) = runs
        assert run["batches"] == batches, name
        assert 0 < run["median_ms"] <= run["sum_ms"], name
        assert run["first_batch_ms"] > 0 and run["wall_s"] > 0, name
        assert any(line.strip().startswith(name) for line in done.stdout.splitlines()), name


def test_a_handoff_runs_from_a_batch_end_to_the_start_it_freed_a_cpu_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    handoffs = importlib.import_module("benchmarks.handoffs").handoffs
    # Two CPUs: the third batch waits for the first end, the fourth for the second, ...
    spans = [(0.0, 10.0), (0.5, 12.0), (11.0, 20.0), (13.0, 25.0), (20.5, 30.0)]
    assert handoffs(spans, cpus=2) == [1.0, 1.0, 0.5]
    assert handoffs(spans[:2], cpus=2) == []
