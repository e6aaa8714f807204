"""W3, CPU-bound: N items of about 10 ms of pure-Python arithmetic, in batches of 20.

The loop length is calibrated once, in the parent, before any run, and travels with each
item (``(x, loops)``), so every implementation does the same work whichever process or
subinterpreter runs it. The ideal is the serial time divided by the CPUs; minigun's
strategies use as many workers as there are CPUs (``max_processes`` = CPUs), and so do the
pools. A strategy the interpreter cannot provide (``interpreters`` before 3.13) is
"unavailable". Children's PSS is sampled for everything that forks.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import select
import statistics
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor

from benchmarks.workload import (
    Impl,
    Measurement,
    Params,
    Workload,
    minigun_impl,
    minigun_on_ray,
    round_by_round,
    start_ray,
)

Item = tuple[int, int]


def cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def work(item: Item) -> int:
    """About 10 ms of pure-Python integer arithmetic (``loops`` calibrated).

    The modulus is made per call, in the calling thread: free-threaded CPython 3.13 does not
    make the constants of an imported module's code immortal, so threads that all load the
    same constant contend on its reference count in every iteration (two threads ran this
    loop at 0.58x the speed of one on 3.13t, queue.Queue + threads and minigun alike): the
    threads rows measured that, not the pipeline."""
    acc, loops = item
    modulus = int("1000003")
    for i in range(loops):
        acc = (acc * 31 + i) % modulus
    return acc


def crunch(batch: list[Item]) -> int:
    return sum(work(item) for item in batch)


def items(params: Params) -> Iterator[Item]:
    loops = params["loops"]
    return ((x, loops) for x in range(params["n"]))


def batches(params: Params) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items(params):
        batch.append(item)
        if len(batch) == params["batch"]:
            yield batch
            batch = []
    if batch:
        yield batch


def calibrate(params: Params) -> Params:
    """Loop iterations for ``ms`` milliseconds of work on this interpreter and machine."""
    trial = 20_000
    best = float("inf")
    # The best of many short trials: on a shared machine most of them are slowed down.
    for _ in range(30):
        start = time.perf_counter()
        work((1, trial))
        best = min(best, time.perf_counter() - start)
    loops = max(1, int(trial * (params["ms"] / 1000) / best))
    params = {**params, "loops": loops, "cpus": params.get("cpus") or cpus()}
    # The checksum every run must compute, worked out once here rather than in each run.
    return {**params, "_expected": serial(params)}


def serial(params: Params) -> int:
    return sum(work(item) for item in items(params))


def minigun(strategy: str) -> Impl:
    def run(params: Params) -> int:
        import minigun as mg

        workers = params["cpus"]
        total = [0]
        limits = {
            "max_processes": workers,
            "max_threads": workers,
            "max_interpreters": workers,
            "max_ray_tasks": workers,
        }
        p = mg.Pipeline(f"w3-{strategy}", config=limits)
        p.producer(lambda: items(params), name="items")
        p.accumulator(name="batch", max_size=params["batch"])
        option = {
            "threads": {"threads": workers},
            "fork_ipc": {"processes": workers},
            "interpreters": {"interpreters": workers},
            "ray": {"actors": workers},
        }.get(strategy, {})
        p.processor(crunch, strategy=strategy, **option)

        @p.consumer
        def add(subtotal: int) -> None:
            total[0] += subtotal

        p.run()
        return total[0]

    if strategy in ("ray", "spawn_ray"):
        return minigun_on_ray(f"minigun {strategy}", run)
    return minigun_impl(f"minigun {strategy}", run, processes=strategy != "threads")


def queue_threads(params: Params) -> int:
    workers = params["cpus"]
    done = object()
    todo: queue.Queue[object] = queue.Queue(maxsize=100)
    total = [0]
    lock = threading.Lock()

    def produce() -> None:
        for batch in batches(params):
            todo.put(batch)
        for _ in range(workers):
            todo.put(done)

    def worker() -> None:
        while (batch := todo.get()) is not done:
            subtotal = crunch(batch)  # type: ignore[arg-type]
            with lock:
                total[0] += subtotal

    threads = [threading.Thread(target=produce)]
    threads += [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total[0]


def pool_imap(params: Params) -> int:
    # Pool start-up included, as minigun's forks are in its time.
    with multiprocessing.get_context("fork").Pool(params["cpus"]) as pool:
        return sum(pool.imap(work, items(params), chunksize=params["batch"]))


def fork_per_batch(params: Params) -> int:
    """What a user writes for spawn_fork's design by hand: a fresh ``os.fork()`` child per
    batch, at most one per CPU at a time, its subtotal pickled back through a pipe. It
    pays a fork, the child's start and its exit per batch, as spawn_fork does: the floor
    of any fork-per-batch design, beside the pools that fork once per worker."""
    running: dict[int, int] = {}  # the read end of a child's result pipe -> its pid
    total = 0

    def collect_one() -> int:
        ready, _, _ = select.select(list(running), [], [])
        pid = running.pop(ready[0])
        with os.fdopen(ready[0], "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise RuntimeError(f"child {pid} ended with status {status} and no subtotal")
        subtotal: int = pickle.loads(data)
        return subtotal

    for batch in batches(params):
        if len(running) == params["cpus"]:
            total += collect_one()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_end)
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(pickle.dumps(crunch(batch)))
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        running[read_end] = pid
    while running:
        total += collect_one()
    return total


def process_pool_executor(params: Params) -> int:
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(params["cpus"], mp_context=context) as pool:
        return sum(pool.map(work, items(params), chunksize=params["batch"]))


def mpire_pool(params: Params) -> int:
    from mpire import WorkerPool

    # mpire unpacks a tuple into arguments: each item goes as a 1-tuple.
    arguments = ((item,) for item in items(params))
    with WorkerPool(n_jobs=params["cpus"], start_method="fork") as pool:
        return sum(pool.imap(work, arguments, chunk_size=params["batch"]))


def pypeln_processes(params: Params) -> int:
    import pypeln as pl

    return sum(pl.process.map(crunch, batches(params), workers=params["cpus"], maxsize=4))


def pyper_processes(params: Params) -> int:
    from pyper import task

    pipeline = (
        task(batches, branch=True) | task(crunch, workers=params["cpus"], multiprocess=True) > sum
    )
    result: int = pipeline(params)
    return result


def streamable_processes(params: Params) -> int:
    from streamable import stream

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(params["cpus"], mp_context=context) as pool:
        return sum(stream(items(params)).group(params["batch"]).map(crunch, concurrency=pool))


def _crunch_here(batch: list[Item]) -> int:
    """``crunch`` as an interpreter pool calls it: the backport's ``call`` runs the
    function's code in the subinterpreter's ``__main__``, so it imports what it needs."""
    from benchmarks.w3_cpu import crunch as crunch_there

    return crunch_there(batch)


def interpreter_pool(params: Params) -> int:
    """InterpreterPoolExecutor (3.14+); on 3.13 the same pool written over the backport:
    one thread per worker, each calling into its own subinterpreter per batch."""
    import concurrent.futures
    import sys

    workers = params["cpus"]
    if hasattr(concurrent.futures, "InterpreterPoolExecutor"):
        with concurrent.futures.InterpreterPoolExecutor(workers) as pool:
            return sum(pool.map(crunch, batches(params)))
    from backports import interpreters

    todo: queue.Queue[list[Item] | None] = queue.Queue(maxsize=2 * workers)
    subtotals: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        interp = interpreters.create()
        try:
            interp.exec(f"import sys; sys.path[:] = {sys.path!r}")
            while (batch := todo.get()) is not None:
                subtotal = interp.call(_crunch_here, batch)
                with lock:
                    subtotals.append(subtotal)
        finally:
            interp.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for batch in batches(params):
        todo.put(batch)
    for _ in threads:
        todo.put(None)
    for thread in threads:
        thread.join()
    return sum(subtotals)


def ray_tasks(params: Params) -> int:
    """Plain Ray: a remote task per batch, at most one per worker in flight (what Ray
    itself costs on this machine, beside minigun's Ray strategies)."""
    import ray

    remote_crunch = ray.remote(crunch)
    pending: list[object] = []
    total = 0
    for batch in batches(params):
        if len(pending) >= params["cpus"]:
            done, pending = ray.wait(pending, num_returns=1)
            total += sum(ray.get(done))
        pending.append(remote_crunch.remote(batch))
    return total + sum(ray.get(pending))


def _has_interpreters() -> str | None:
    """Why this Python has no subinterpreters to pool, or None."""
    import sys

    if sys.version_info < (3, 13):
        return "needs CPython 3.13+"
    if sys.version_info < (3, 14):
        try:
            import backports.interpreters  # noqa: F401
        except ImportError:
            return "needs backports.interpreters"
    return None


def _ideal(params: Params, best: Mapping[str, float]) -> float | None:
    took = best.get("serial loop")
    return None if took is None else took / params["cpus"]


def _notes(params: Params, results: Mapping[str, Measurement]) -> list[str]:
    notes = [
        f"{params['loops']:,} loop iterations per item (~{params['ms']:g} ms here),"
        f" {params['cpus']} worker(s); ideal = serial / {params['cpus']}"
        " (measured by the 'serial' row)"
    ]
    # The process strategies sit within a few percent of multiprocessing.Pool, less than
    # this machine's speed drifts between rounds: the ratios of each round say more.
    # spawn_fork is also set beside the floor of its design, a hand-written fork per batch.
    pool, by_hand = "multiprocessing.Pool.imap", "os.fork per batch"
    for subject, baseline in (
        ("minigun spawn_fork", pool),
        ("minigun fork_ipc", pool),
        ("minigun spawn_fork", by_hand),
    ):
        ratios = round_by_round(results[subject], results[baseline])
        if ratios:
            notes.append(
                f"{subject} against {baseline}, round by round: median"
                f" {statistics.median(ratios):.2f}x ({ratios[0]:.2f}x to {ratios[-1]:.2f}x"
                f" over {len(ratios)} round(s))"
            )
    return notes


WORKLOADS = (
    Workload(
        key="W3",
        module=__name__,
        title="CPU-bound: N items of ~10 ms pure Python, batches of 20, one worker per CPU",
        impls=(
            minigun("threads"),
            minigun("spawn_fork"),
            minigun("fork_ipc"),
            minigun("interpreters"),
            minigun("spawn_interpreter"),
            minigun("ray"),
            minigun("spawn_ray"),
            Impl("serial loop", serial),
            Impl("queue.Queue + threads", queue_threads),
            Impl("multiprocessing.Pool.imap", pool_imap, processes=True),
            Impl("ProcessPoolExecutor.map", process_pool_executor, processes=True),
            Impl("os.fork per batch", fork_per_batch, processes=True),
            Impl("interpreter pool", interpreter_pool, unavailable=_has_interpreters),
            Impl("Ray tasks", ray_tasks, requires="ray", imports=("ray",), setup=start_ray),
            Impl("mpire", mpire_pool, requires="mpire", processes=True),
            Impl("pypeln process", pypeln_processes, requires="pypeln", processes=True),
            Impl("pyper multiprocess", pyper_processes, requires="pyper", processes=True),
            Impl(
                "streamable + processes",
                streamable_processes,
                requires="streamable",
                processes=True,
            ),
        ),
        subjects=(
            "minigun threads",
            "minigun spawn_fork",
            "minigun fork_ipc",
            "minigun interpreters",
            "minigun spawn_interpreter",
            "minigun ray",
            "minigun spawn_ray",
        ),
        full={"n": 400, "batch": 20, "ms": 10.0},
        quick={"n": 20, "batch": 5, "ms": 1.0},
        count=lambda params: params["n"],
        expected=lambda params: params["_expected"],
        ideal_seconds=_ideal,
        unit="s",
        prepare=calibrate,
        notes=_notes,
    ),
)
