#!/usr/bin/env bash
# Get a CPython 3.13 the tests need, and print its path on the last line of stdout.
#
#   bash scripts/get-python.sh 3.13       # 3.13 with the GIL          -> /opt/cpython-3.13
#   bash scripts/get-python.sh 3.13 t     # free-threaded 3.13t         -> /opt/cpython-3.13t
#
# Where it comes from, first match wins:
#   1. MINIGUN_PYTHON_3_13 / MINIGUN_PYTHON_3_13T: an interpreter the machine already has
#      (checked for the right version and GIL mode, never built);
#   2. the cache: a complete build already in the prefix (MINIGUN_PYTHON_PREFIX overrides
#      /opt/cpython-3.13[t]), whoever built it;
#   3. a build from the upstream tarball that Debian trixie's python3.13 source package
#      carries (about 3.5 minutes on 2 cores; needs root for apt-get). Debian ships no
#      free-threaded binary, and no other CPython source is reachable from these machines.
# Progress goes to stderr. Two runs at once build once: the second waits for the first.
set -euo pipefail

usage() { echo "usage: $0 3.13 [t]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
version=$1
flavour=${2:-}            # "t": free-threaded (no GIL)
[ "$version" = 3.13 ] || { echo "get-python: only 3.13 is available here (asked for $version)" >&2; exit 2; }
case $flavour in
  "") gil=1 ;;
  t) gil=0 ;;
  *) usage ;;
esac

log() { echo "get-python: $*" >&2; }

# is_wanted PYTHON: exit 0 if PYTHON runs, is $version, has the wanted GIL mode and a pip
# (pip is the last thing `make install` puts in place, so a half-installed prefix fails).
is_wanted() {
  "$1" - "$version" "$gil" <<'EOF' >/dev/null 2>&1
import importlib.util, sys, sysconfig
version, gil = sys.argv[1], sys.argv[2] == "1"
assert "%d.%d" % sys.version_info[:2] == version
assert (not sysconfig.get_config_var("Py_GIL_DISABLED")) == gil
assert importlib.util.find_spec("pip") and importlib.util.find_spec("venv")
EOF
}

# 1. An interpreter named by the environment.
env_var=MINIGUN_PYTHON_${version//./_}${flavour^^}
if [ -n "${!env_var:-}" ]; then
  python=${!env_var}
  is_wanted "$python" || { log "$env_var=$python is not a CPython $version$flavour with pip and venv"; exit 1; }
  echo "$python"
  exit 0
fi

# 2. The cache.
prefix=${MINIGUN_PYTHON_PREFIX:-/opt/cpython-$version$flavour}
python=$prefix/bin/python$version$flavour
if is_wanted "$python"; then echo "$python"; exit 0; fi

# 3. Build it, holding a lock so that a concurrent run waits and then takes the cache.
mkdir -p "$(dirname "$prefix")"
exec 9>"$prefix.lock"
flock 9
if is_wanted "$python"; then echo "$python"; exit 0; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# apt with a private source list, list directory and cache, so that the machine's own apt
# state is left as it was. The mirror is the one the machine's apt sources already use.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { log "no Debian mirror in the apt sources"; exit 1; }
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
  >"$work/sources.list"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
private_apt=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=-"
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")

log "fetching the python$version source package of Debian trixie from $mirror"
apt-get "${private_apt[@]}" -qq update >&2
mkdir "$work/src"
(cd "$work/src" && apt-get "${private_apt[@]}" -qq source --download-only "python$version" >&2)
tarball=$(ls "$work"/src/python"$version"_*.orig.tar.xz)
log "source: $(basename "$tarball")"

build_deps=(build-essential pkg-config xz-utils libssl-dev zlib1g-dev libbz2-dev liblzma-dev
  libzstd-dev libffi-dev libreadline-dev libncurses-dev libsqlite3-dev libgdbm-dev uuid-dev
  libexpat1-dev)
if ! dpkg-query -W -f='${Status}\n' "${build_deps[@]}" 2>/dev/null | grep -qv '^install ok installed$' \
   && [ "$(dpkg-query -W -f='${Status}\n' "${build_deps[@]}" 2>/dev/null | wc -l)" -eq "${#build_deps[@]}" ]; then
  log "build dependencies already installed"
else
  log "installing the build dependencies"
  apt-get -qq update >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${build_deps[@]}" >&2
fi

log "building CPython $version$flavour into $prefix (logs in $work until it ends)"
tar -xf "$tarball" -C "$work"
cd "$work"/Python-"$version".*/
run_step() {  # run_step NAME COMMAND...: quiet unless it fails
  "${@:2}" >"$work/$1.log" 2>&1 || { tail -n 40 "$work/$1.log" >&2; log "$1 failed"; exit 1; }
}
run_step configure ./configure --prefix="$prefix" ${flavour:+--disable-gil} --with-ensurepip=install
run_step make make -j"$(nproc)"
run_step install make install

is_wanted "$python" || { log "the build in $prefix is not a working CPython $version$flavour"; exit 1; }
log "built $("$python" -VV)"
echo "$python"
