#!/usr/bin/env bash
# Install everything the tests need and run every test, on a bare clone:
#   the advisory check, Rust unit tests, quality gates, the pytest suite on CPython 3.11,
#   3.13 (GIL) and free-threaded 3.13t, then the wheels built and installed by a test.
# Usage: bash scripts/test.sh      (what .ci/run and the README's test command run)
# Interpreters: PYTHON (default python3, a 3.11), and 3.13 / 3.13t from scripts/get-python.sh
# (MINIGUN_PYTHON_3_13 / MINIGUN_PYTHON_3_13T name ones the machine already has).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { printf '\n== %s\n' "$*"; }

# The test dependencies. hypothesis is taken as a wheel: its newest sdists build a Rust
# extension whose PyO3 refuses free-threaded 3.13.
deps=(maturin pytest pytest-timeout hypothesis ruff rich)

make_venv() {  # make_venv PYTHON DIR EXTRAS: a venv with the test deps and minigun built into it
  local python=$1 dir=$2 extras=$3
  [ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check --only-binary=hypothesis "${deps[@]}"
  VIRTUAL_ENV="$root/$dir" "$dir/bin/maturin" develop --release -q --extras "$extras"
}

pytest_in() {  # pytest_in DIR [ARGS...]
  local dir=$1
  shift
  "$dir/bin/python" -m pytest -q -p no:cacheprovider -m "not wheels and not stress and not ray" "$@"
}

ray_in() {  # ray_in DIR: the Ray tests, in a session of their own (one local Ray for all)
  # -v names each test as it starts, so a session that dies says in which test.
  local status=0
  "$1/bin/python" -m pytest -v -p no:cacheprovider -m ray || status=$?
  if [ "$status" -ne 0 ]; then
    ray_logs
    return "$status"
  fi
}

ray_logs() {  # the warnings and errors of the last local Ray's own processes
  local logs=/tmp/ray/session_latest/logs file
  [ -d "$logs" ] || return 0
  for file in "$logs"/raylet.out "$logs"/gcs_server.out "$logs"/python-core-driver-*.log; do
    [ -f "$file" ] || continue
    printf '\n-- %s: its last warnings and errors\n' "$file"
    grep -E '^\[[^]]* [WEF] ' "$file" | tail -n 30 || true
  done
}

stress_in() {  # stress_in DIR: the fork stress tests, bounded by MINIGUN_STRESS_SECONDS
  MINIGUN_STRESS_SECONDS=${MINIGUN_STRESS_SECONDS:-20} \
    "$1/bin/python" -m pytest -q -p no:cacheprovider -m stress
}

test_cpython_311() {
  log "CPython 3.11: build and pytest"
  make_venv "${PYTHON:-python3}" .venv ray
  pytest_in .venv
  ray_in .venv
  stress_in .venv
}

test_cpython_313() {
  log "CPython 3.13 (GIL): build and pytest"
  make_venv "$(bash scripts/get-python.sh 3.13 | tail -n 1)" .venv-313 interpreters,ray
  pytest_in .venv-313
  ray_in .venv-313
}

test_cpython_313t() {
  log "free-threaded CPython 3.13t: build and pytest"
  # Ray has no wheels for free-threaded CPython: its tests skip here, saying so.
  make_venv "$(bash scripts/get-python.sh 3.13 t | tail -n 1)" .venv-313t interpreters
  pytest_in .venv-313t
  stress_in .venv-313t
}

test_wheels() {
  log "wheels: build (manylinux2014, stripped, audited), install each into a fresh venv"
  bash scripts/build-wheels.sh dist/wheels
  MINIGUN_WHEEL_DIR=$root/dist/wheels \
    MINIGUN_WHEEL_PYTHONS="$root/.venv/bin/python:$(bash scripts/get-python.sh 3.13 | tail -n 1):$(bash scripts/get-python.sh 3.13 t | tail -n 1)" \
    .venv/bin/python -m pytest -q -p no:cacheprovider -m wheels tests/test_wheels.py
}

log "advisory check (RUSTSEC-2026-0176, RUSTSEC-2026-0177)"
python3 scripts/check_advisories.py

log "cargo test"
cargo test --quiet

test_cpython_311

log "quality gates"
.venv/bin/ruff check python tests benchmarks examples scripts
.venv/bin/ruff format --check python tests benchmarks examples scripts
cargo fmt --check
cargo clippy --quiet -- -D warnings
# mypy only in the 3.11 venv: its ast-serialize dependency does not build on free-threaded 3.13.
.venv/bin/python -m pip install -q --disable-pip-version-check mypy
.venv/bin/python -m mypy --strict python/minigun
.venv/bin/python -m mypy.stubtest minigun._minigun
.venv/bin/python -m mypy --strict tests/typing/user_code.py examples/

test_cpython_313
test_cpython_313t
test_wheels
