"""One measured run, in a fresh process: ``python -m benchmarks.child MODULE KEY IMPL PARAMS
RESULT_PATH`` (started by benchmarks/runner.py).

It imports the workload and what the implementation needs, then times only the run with
``perf_counter``, checks the checksum and writes the wall time and its own peak RSS
(``VmHWM``) to RESULT_PATH as JSON. Exit codes say why it did not measure: 3, a peer
is not installed; 4, minigun cannot provide the strategy here; 1, the run failed.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
import traceback

from benchmarks.workload import EXIT_NOT_INSTALLED, EXIT_UNAVAILABLE, Workload


def peak_rss_kb() -> int:
    """This process's peak RSS. Not ``ru_maxrss``: Linux carries that over ``exec`` from
    the forked parent, so every child would report at least the parent's size; ``VmHWM``
    belongs to this process's own address space."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(module_name: str, key: str, impl_name: str, params_json: str, result_path: str) -> int:
    workloads: tuple[Workload, ...] = importlib.import_module(module_name).WORKLOADS
    (workload,) = [workload for workload in workloads if workload.key == key]
    impl = workload.impl(impl_name)
    params = json.loads(params_json)
    if impl.requires is not None:
        try:
            importlib.import_module(impl.requires)
        except ImportError as error:
            print(f"{impl.requires}: {error}", file=sys.stderr)
            return EXIT_NOT_INSTALLED
    if impl.unavailable is not None and (why := impl.unavailable()):
        print(why, file=sys.stderr)
        return EXIT_UNAVAILABLE
    # Imported before the clock starts: a run's time is its work, not its imports.
    for module in impl.imports:
        importlib.import_module(module)
    if impl.setup is not None:
        impl.setup(params)
    start = time.perf_counter()
    try:
        got = impl.run(params)
    except Exception as error:
        # Known by name: this process imports minigun only for minigun's implementations.
        if type(error).__name__ == "UnsupportedStrategy":
            print(f"{type(error).__name__}: {error}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        traceback.print_exc()
        return 1
    seconds = time.perf_counter() - start
    want = workload.expected(params)
    if got != want:
        print(f"{impl_name} computed {got!r}, expected {want!r}", file=sys.stderr)
        return 1
    max_rss_kb = peak_rss_kb()
    with open(result_path, "w") as result:
        json.dump({"seconds": seconds, "max_rss_kb": max_rss_kb}, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
