#!/usr/bin/env bash
# Install everything the tests need and run every test: Rust unit tests, then the pytest
# suite on CPython 3.11 and on the free-threaded CPython 3.13t (built once, cached in /opt).
# Usage: bash scripts/test.sh            (what .ci/run and README's test command run)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { printf '\n== %s\n' "$*"; }

# The test dependencies. hypothesis is taken as a wheel: its newest sdists build a Rust
# extension whose PyO3 refuses free-threaded 3.13.
deps=(maturin pytest pytest-timeout hypothesis ruff rich)

make_venv() {  # make_venv PYTHON DIR
  local python=$1 dir=$2
  [ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check --only-binary=hypothesis "${deps[@]}"
  VIRTUAL_ENV="$root/$dir" "$dir/bin/maturin" develop --release -q
}

log "cargo test"
cargo test --quiet

log "CPython 3.11: build and pytest"
make_venv "${PYTHON:-python3}" .venv
.venv/bin/ruff check python tests benchmarks examples
# mypy only here: its ast-serialize dependency does not build on free-threaded 3.13.
.venv/bin/python -m pip install -q --disable-pip-version-check mypy
.venv/bin/python -m mypy --strict tests/typing/user_code.py examples/
.venv/bin/python -m pytest -q -p no:cacheprovider

log "free-threaded CPython 3.13t: build and pytest"
ft_python=$(bash ../shared/tools/build-python.sh | tail -n 1)
make_venv "$ft_python" .venv-ft
.venv-ft/bin/python -m pytest -q -p no:cacheprovider
