"""The built wheels install into a fresh venv, far from the source tree, and run a pipeline.

Behind the `wheels` marker: scripts/test.sh builds the wheels once (scripts/build-wheels.sh)
and runs this with MINIGUN_WHEEL_DIR set to them and MINIGUN_WHEEL_PYTHONS to the
interpreters to install them on (colon-separated).
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.wheels, pytest.mark.timeout(300)]

WHEEL_DIR = os.environ.get("MINIGUN_WHEEL_DIR")
PYTHONS = [p for p in os.environ.get("MINIGUN_WHEEL_PYTHONS", sys.executable).split(":") if p]
MANYLINUX2014 = "manylinux_2_17_x86_64"

# Run in the fresh venv with `python -I`: neither the cwd nor PYTHONPATH is on sys.path.
PIPELINE = """
import os, sys, sysconfig
import minigun as mg

assert mg.__file__.startswith(sysconfig.get_path("purelib")), mg.__file__

class Job(mg.Task):
    @mg.producer
    def numbers(self):
        yield from range(100)

    @mg.processor(threads=2)
    def square(self, n):
        return n * n

    @mg.accumulator(max_size=10)
    def batch(self, items):
        return items

    @mg.consumer(strategy="spawn_fork")
    def report(self, items):
        print(os.getpid() != parent, sum(items), flush=True)

parent = os.getpid()
Job().run()
print("gil", getattr(sys, "_is_gil_enabled", lambda: True)())
"""


def wheels() -> list[Path]:
    if not WHEEL_DIR:
        return []
    return sorted(Path(WHEEL_DIR).glob("minigun_pipelines-*.whl"))


def test_wheels_were_built():
    if not WHEEL_DIR:
        pytest.skip("MINIGUN_WHEEL_DIR is not set: scripts/test.sh builds the wheels")
    names = [w.name for w in wheels()]
    assert any("-cp311-abi3-" in n for n in names), names
    assert any("-cp313-cp313t-" in n for n in names), names


@pytest.mark.parametrize("wheel", wheels(), ids=lambda w: w.name)
def test_wheel_is_manylinux2014_and_stripped(wheel):
    assert MANYLINUX2014 in wheel.name
    with zipfile.ZipFile(wheel) as archive:
        [extension] = [n for n in archive.namelist() if n.endswith(".so")]
        elf = archive.read(extension)
    assert b".symtab" not in elf, f"{extension} in {wheel.name} is not stripped"


@pytest.mark.parametrize("python", PYTHONS)
def test_wheel_installs_into_a_fresh_venv_and_runs_a_pipeline(python, tmp_path):
    if not WHEEL_DIR:
        pytest.skip("MINIGUN_WHEEL_DIR is not set: scripts/test.sh builds the wheels")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    venv_python = str(venv / "bin" / "python")
    # pip picks the wheel whose tags this interpreter accepts; --no-index: nothing else.
    subprocess.run(
        [
            venv_python,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
            WHEEL_DIR,
            "minigun-pipelines",
        ],
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
    result = subprocess.run(
        [venv_python, "-I", "-c", PIPELINE],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.split("\n")
    sums = sorted(int(line.split()[1]) for line in lines if line.startswith("True "))
    assert sum(sums) == sum(n * n for n in range(100)) and len(sums) == 10, result.stdout
    ask_gil_disabled = "import sysconfig; print(bool(sysconfig.get_config_var('Py_GIL_DISABLED')))"
    answer = subprocess.run(
        [python, "-c", ask_gil_disabled], capture_output=True, text=True, check=True
    )
    free_threaded = answer.stdout.strip() == "True"
    # The extension must not switch the GIL back on in a free-threaded interpreter.
    assert f"gil {not free_threaded}" in result.stdout
