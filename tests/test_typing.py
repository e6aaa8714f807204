"""Types and metadata survive decoration: mypy --strict passes on a typed user file and on
examples/, and a stage keeps its function's name, docstring and signature."""

from __future__ import annotations

import inspect
import pathlib
import subprocess
import sys

import pytest

import minigun as mg

ROOT = pathlib.Path(__file__).parent.parent


class Job(mg.Task):
    @mg.producer
    def numbers(self):
        yield 1

    @mg.processor(threads=2)
    def double(self, n: int, scale: int = 2) -> int:
        """Twice the item."""
        return n * scale


def test_stage_keeps_the_function_metadata():
    stage = Job.double
    assert isinstance(stage, mg.Stage)
    assert stage.__doc__ == "Twice the item."
    assert stage.__name__ == "double" and stage.__qualname__.endswith("Job.double")
    assert stage.__wrapped__.__name__ == "double"
    assert list(inspect.signature(stage).parameters) == ["self", "n", "scale"]
    assert Job().double(3) == 6  # on an instance it is the plain method


@pytest.mark.parametrize("target", ["tests/typing/user_code.py", "examples"])
def test_mypy_strict_passes(target):
    pytest.importorskip("mypy")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            "/dev/null",
            target,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
