#!/usr/bin/env bash
# Build the wheels a service installs, into OUTDIR (default dist/):
#   minigun_pipelines-*-cp311-abi3-manylinux_2_17_x86_64...whl   every CPython >= 3.11 with the GIL
#   minigun_pipelines-*-cp313-cp313t-manylinux_2_17_x86_64...whl  free-threaded 3.13t
# manylinux2014 (glibc 2.17) through maturin's --zig linker, no container; stripped; each one
# checked with `auditwheel show`. Tools come from PyPI into .venv-wheels.
#
#   bash scripts/build-wheels.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
outdir=$(realpath -m "${1:-dist}")
tools=.venv-wheels

log() { echo "build-wheels: $*" >&2; }

[ -x "$tools/bin/python" ] || python3 -m venv "$tools"
"$tools/bin/python" -m pip install -q --disable-pip-version-check maturin ziglang auditwheel

gil_python=${PYTHON:-python3}
ft_python=$(bash scripts/get-python.sh 3.13 t | tail -n 1)
mkdir -p "$outdir"
rm -f "$outdir"/minigun_pipelines-*.whl

for python in "$gil_python" "$ft_python"; do
  log "building for $("$python" -VV | head -n 1)"
  # --zig puts ziglang's `python -m ziglang` on the link line, so that it finds that module.
  PATH="$PWD/$tools/bin:$PATH" "$tools/bin/maturin" build --release --strip --zig \
    --compatibility manylinux2014 --interpreter "$python" --out "$outdir" --quiet >&2
done

status=0
for wheel in "$outdir"/minigun_pipelines-*.whl; do
  report=$("$tools/bin/auditwheel" show "$wheel")
  # auditwheel wraps its prose at any word: compare with the whitespace squeezed.
  if tr -s ' \n' '  ' <<<"$report" | grep -q 'consistent with the following platform tag: "manylinux_2_17_x86_64"'; then
    log "auditwheel: $(basename "$wheel") qualifies for manylinux_2_17_x86_64"
  else
    log "auditwheel: $(basename "$wheel") is not manylinux2014 compatible:"
    echo "$report" >&2
    status=1
  fi
done
ls "$outdir"/minigun_pipelines-*.whl
exit $status
