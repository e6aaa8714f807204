"""The benchmark's own virtual environment: minigun built from this tree, plus the peers.

``python -m benchmarks`` run by any interpreter makes ``.venv-bench-<tag>`` in the
repository root (git-ignored; one per interpreter, so 3.11 and 3.13t do not share one),
installs ``benchmarks/requirements.txt`` into it one requirement at a time (a peer that
does not install on this interpreter is reported "not installed" by the suite, not a
crash), builds minigun into it with ``maturin develop --release --extras interpreters``
and runs the suite again with that environment's interpreter. The peers are never
dependencies of the package.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "benchmarks" / "requirements.txt"


def interpreter_tag() -> str:
    """cpython-311, cpython-313t: which interpreter a bench environment belongs to."""
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    return sys.implementation.cache_tag + ("t" if free_threaded else "")


def venv_dir() -> Path:
    return ROOT / f".venv-bench-{interpreter_tag()}"


def in_bench_venv() -> bool:
    return Path(sys.prefix).resolve() == venv_dir().resolve()


def _requirements() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def _log(message: str) -> None:
    print(f"benchmarks: {message}", file=sys.stderr, flush=True)


def ensure(build: bool = True) -> Path:
    """Make (or bring up to date) the bench environment; return its interpreter."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    if not python.exists():
        _log(f"creating {venv.name} with {sys.executable}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    stamp = venv / "requirements.sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        subprocess.run([*pip, "maturin>=1.5,<2"], check=True)
        missing = []
        for requirement in _requirements():
            _log(f"installing {requirement}")
            done = subprocess.run([*pip, requirement], capture_output=True, text=True)
            if done.returncode != 0:
                missing.append(requirement)
                tail = (done.stderr.strip().splitlines() or [""])[-1]
                _log(f"  {requirement} did not install here (reported 'not installed'): {tail}")
        stamp.write_text(wanted)
        if missing:
            _log(f"not installed: {', '.join(missing)}")
    if build:
        # The interpreters extra installs the subinterpreter backport where one is needed
        # (CPython 3.13), so the suite measures that strategy there too; elsewhere it
        # installs nothing.
        _log("building minigun into it (maturin develop --release --extras interpreters)")
        env = {**os.environ, "VIRTUAL_ENV": str(venv)}
        subprocess.run(
            [
                str(venv / "bin" / "maturin"),
                "develop",
                "--release",
                "-q",
                "--extras",
                "interpreters",
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
    return python
