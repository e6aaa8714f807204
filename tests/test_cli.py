"""The command line: python -m minigun (API.md section 9)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import minigun as mg

JOBS = textwrap.dedent("""
    import time
    import minigun as mg

    class Scaled(mg.Task):
        def __init__(self, factor, label="x", count=5):
            self.factor, self.label, self.count = factor, label, count

        @mg.producer
        def numbers(self):
            yield from range(self.count)

        @mg.processor
        def scale(self, n):
            assert isinstance(self.label, str)
            return n * self.factor

    class Broken(mg.Task):
        @mg.producer
        def numbers(self):
            yield from range(3)

        @mg.processor
        def boom(self, n):
            raise ValueError("bad item")

    class Forever(mg.Task):
        @mg.producer
        def numbers(self):
            while True:
                time.sleep(0.01)
                yield 1

        @mg.consumer
        def sink(self, n):
            pass

    pipe = mg.Pipeline("pipe")
    pipe.producer(lambda: range(3), name="numbers")
    pipe.consumer(lambda n: None, name="sink")

    not_a_job = 42
""")


@pytest.fixture
def jobs(tmp_path):
    (tmp_path / "cli_jobs.py").write_text(JOBS)
    return tmp_path


def minigun(*args, cwd, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run(
        [sys.executable, "-m", "minigun", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_version():
    done = minigun("--version", cwd=".")
    assert done.returncode == 0 and done.stdout.strip() == f"minigun {mg.__version__}"


def test_run_with_constructor_arguments_as_literals_and_strings(jobs):
    done = minigun(
        "run", "cli_jobs:Scaled", "--arg", "factor=3", "--arg", "label=hello", "--json", cwd=jobs
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["status"] == "ok"
    assert data["stages"]["scale"]["items_out"] == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "no_such_module:Job"], "no module named 'no_such_module'"),
        (["run", "cli_jobs:Missing"], "has no 'Missing'"),
        (["run", "cli_jobs:not_a_job"], "is a int, not a minigun Task or Pipeline"),
        (["run", "cli_jobs:Scaled"], "missing a required argument: 'factor'"),
        (
            ["run", "cli_jobs:Scaled", "--arg", "speed=2", "--arg", "factor=1"],
            "unexpected keyword argument 'speed'",
        ),
        (["run", "cli_jobs:Scaled", "--arg", "factor"], "--arg takes NAME=VALUE"),
        (["run", "cli_jobs"], "expected MODULE:TASK"),
        (["run", "cli_jobs:pipe", "--arg", "x=1"], "--arg applies to a Task class"),
        (["dag", "cli_jobs:not_a_job"], "not a minigun Task or Pipeline"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(jobs, args, message):
    done = minigun(*args, cwd=jobs)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("minigun: "), done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_failed_run_prints_its_summary_and_exits_1(jobs):
    done = minigun("run", "cli_jobs:Broken", cwd=jobs)
    assert done.returncode == 1
    assert done.stdout.startswith("run failed") and "boom" in done.stdout
    assert "ValueError: bad item" in done.stderr and "Traceback" not in done.stderr


def test_module_level_pipeline_runs_with_progress(jobs):
    done = minigun("run", "cli_jobs:pipe", "--progress", cwd=jobs)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("run ok")
    assert "minigun:" in done.stderr and "sink" in done.stderr


def test_verbose_logs_debug_lines(jobs):
    done = minigun("-v", "run", "cli_jobs:pipe", cwd=jobs)
    assert done.returncode == 0
    assert "DEBUG" in done.stderr and "starting 1 worker" in done.stderr


def test_help_has_no_markup():
    for args in (["--help"], ["run", "--help"], ["demo", "--help"]):
        done = minigun(*args, cwd=".")
        assert done.returncode == 0
        assert "``" not in done.stdout and "--arg" in minigun("run", "--help", cwd=".").stdout


def test_ctrl_c_exits_130(jobs):
    env = dict(os.environ, PYTHONPATH=str(jobs))
    proc = subprocess.Popen(
        [sys.executable, "-m", "minigun", "run", "cli_jobs:Forever"],
        cwd=jobs,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err


def test_demo_on_a_named_database(tmp_path):
    db = tmp_path / "demo.db"
    done = minigun("demo", "--records", "3000", "--db", str(db), cwd=tmp_path, timeout=100)
    assert done.returncode == 0, done.stderr
    assert "rows read back from priced_orders: 3,000 of 3,000" in done.stdout
    assert "bottleneck:" in done.stdout
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM priced_orders").fetchone()[0] == 3000
    assert done.stderr == ""  # no warnings, and no progress view without a terminal
