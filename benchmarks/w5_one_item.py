"""W5, what a service pays per call: a one-item run, repeated; and ``import minigun``.

W5: one item through producer -> ``x * 2`` -> consumer, R times in one process (pipeline
built and run each time), against calling the functions and against starting a
queue.Queue + threads pipeline or a ThreadPoolExecutor per call. Reported in ms per run.

W5-elsewhere: the same one-item run with its stage in a worker the run starts (a forked
child, a subinterpreter, a Ray actor or task): what a call pays for that worker.

W5-import: R fresh interpreters each running ``import minigun``, against R bare ones
(``python -c pass``); the difference is what importing minigun costs a process. minigun's
bytecode is compiled before the clock, as pip compiles an installed wheel's.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

from benchmarks.workload import Impl, Measurement, Params, Workload, minigun_impl, minigun_on_ray


def one(x: int) -> Iterator[int]:
    yield x


def double(x: int) -> int:
    return x * 2


def plain_call(params: Params) -> int:
    total = 0
    for run in range(params["runs"]):
        for x in one(run):
            total += double(x)
    return total


def queue_threads(params: Params) -> int:
    total = 0
    done = object()
    for run in range(params["runs"]):
        to_double: queue.Queue[object] = queue.Queue(maxsize=1000)
        out: list[int] = []

        def produce(run: int = run, inbox: queue.Queue[object] = to_double) -> None:
            for x in one(run):
                inbox.put(x)
            inbox.put(done)

        def process(inbox: queue.Queue[object] = to_double, out: list[int] = out) -> None:
            while (x := inbox.get()) is not done:
                out.append(double(x))  # type: ignore[arg-type]

        threads = [threading.Thread(target=produce), threading.Thread(target=process)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total += sum(out)
    return total


def thread_pool(params: Params) -> int:
    total = 0
    for run in range(params["runs"]):
        with ThreadPoolExecutor(1) as pool:
            total += sum(pool.map(double, one(run)))
    return total


def minigun(params: Params) -> int:
    return _minigun(params, {})


def minigun_inline(params: Params) -> int:
    """Both stages ``inline``: the run starts one thread, the producer's, not three."""
    return _minigun(params, {"strategy": "inline"}, {"strategy": "inline"})


def _minigun(
    params: Params, options: dict[str, object], consumer: dict[str, object] | None = None
) -> int:
    import minigun as mg

    total = [0]

    def add(x: int) -> None:
        total[0] += x

    for run in range(params["runs"]):
        p = mg.Pipeline("w5")
        p.producer(lambda run=run: one(run), name="one")
        p.processor(double, **options)
        p.consumer(add, **(consumer or {}))
        p.run()
    return total[0]


def minigun_elsewhere(strategy: str) -> Impl:
    """The one-item run with its stage in a worker elsewhere (started by the run)."""

    def run(params: Params) -> int:
        return _minigun(params, {"strategy": strategy})

    name = f"minigun {strategy}"
    if strategy in ("ray", "spawn_ray"):
        return minigun_on_ray(name, run)
    return minigun_impl(name, run, processes=strategy == "fork_ipc")


def _interpreters(code: str):  # type: ignore[no-untyped-def]
    def run(params: Params) -> int:
        for _ in range(params["runs"]):
            subprocess.run([sys.executable, "-c", code], check=True)
        return int(params["runs"])

    return run


def _compile_bytecode(params: Params) -> None:
    """What pip does when it installs a wheel: minigun's modules compiled to bytecode first,
    so the clock measures importing them, not compiling them (with PYTHONDONTWRITEBYTECODE
    set, as on some machines, an editable install would compile every module on every
    import: 43 ms of the 50 measured here before this step)."""
    import compileall
    import importlib.util
    import os

    spec = importlib.util.find_spec("minigun")
    assert spec is not None and spec.origin is not None
    compileall.compile_dir(os.path.dirname(spec.origin), quiet=1)


def _import_notes(params: Params, results: Mapping[str, Measurement]) -> list[str]:
    bare = results["python -c pass"].best
    imported = results["python -c 'import minigun'"].best
    if bare is None or imported is None:
        return []
    over = (imported - bare) * 1000 / params["runs"]
    return [f"import minigun: {over:.1f} ms over a bare interpreter"]


def _expected_sum(params: Params) -> int:
    runs = params["runs"]
    return int(runs * (runs - 1))


WORKLOADS = (
    Workload(
        key="W5",
        module=__name__,
        title="one-item run (pipeline built and run per call), R calls",
        impls=(
            minigun_impl("minigun", minigun),
            minigun_impl("minigun inline", minigun_inline),
            Impl("plain call", plain_call),
            Impl("queue.Queue + threads", queue_threads),
            Impl("ThreadPoolExecutor", thread_pool),
        ),
        subjects=("minigun", "minigun inline"),
        full={"runs": 1_000},
        quick={"runs": 10},
        count=lambda params: params["runs"],
        expected=_expected_sum,
        unit="ms",
    ),
    Workload(
        key="W5-elsewhere",
        module=__name__,
        title="one-item run with the stage in a worker elsewhere (started by the run), R calls",
        impls=(
            minigun_impl("minigun threads", minigun),
            minigun_elsewhere("spawn_fork"),
            minigun_elsewhere("fork_ipc"),
            minigun_elsewhere("interpreters"),
            minigun_elsewhere("ray"),
            minigun_elsewhere("spawn_ray"),
        ),
        subjects=("minigun fork_ipc",),
        full={"runs": 20},
        quick={"runs": 1},
        count=lambda params: params["runs"],
        expected=_expected_sum,
        unit="ms",
        notes=lambda params, results: [
            "Ray (where installed) is started before the clock, as a user's would be"
        ],
    ),
    Workload(
        key="W5-import",
        module=__name__,
        title="start-up: R fresh interpreters, bare and importing minigun",
        impls=(
            Impl(
                "python -c 'import minigun'",
                _interpreters("import minigun"),
                setup=_compile_bytecode,
            ),
            Impl("python -c pass", _interpreters("pass")),
        ),
        subjects=(),
        full={"runs": 20},
        quick={"runs": 1},
        count=lambda params: params["runs"],
        expected=lambda params: params["runs"],
        unit="ms",
        notes=_import_notes,
    ),
)
