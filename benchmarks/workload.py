"""What a workload is: the same work done by several implementations, and what they gave.

A workload module lists its :class:`Workload` objects in ``WORKLOADS``. Each implementation
is a function of the workload's parameters that returns a checksum, which the run checks
against the workload's expected value. This module is imported by every measured process,
so it imports little: a baseline's peak RSS should be its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Params = dict[str, Any]

# Statuses of one implementation, in the JSON report and the table.
OK = "ok"
FAILED = "failed"
TIMEOUT = "timeout"
NOT_INSTALLED = "not installed"
UNAVAILABLE = "unavailable"
SKIPPED = "skipped"

# Exit codes a measured process uses to say why it did not measure.
EXIT_NOT_INSTALLED = 3
EXIT_UNAVAILABLE = 4


@dataclass(frozen=True)
class Impl:
    """One way of doing a workload's work."""

    name: str
    run: Callable[[Params], int]
    # The import name of the peer library it needs; None for minigun and the stdlib.
    requires: str | None = None
    # Modules the measured process imports before the clock starts (the implementation
    # imports them again inside its function, which is then free).
    imports: tuple[str, ...] = ()
    # It starts processes: sample its children's PSS.
    processes: bool = False
    # Why this interpreter cannot run it (a stdlib feature it lacks), else None.
    unavailable: Callable[[], str | None] | None = None
    # Runs in the measured process before the clock starts: what a user has in place
    # already (a local Ray running, an installed package's bytecode compiled).
    setup: Callable[[Params], None] | None = None


@dataclass(frozen=True)
class Workload:
    """The same work done by several implementations, compared in one run."""

    key: str
    # The module that defines it (its ``__name__``): the child process imports it.
    module: str
    title: str
    impls: tuple[Impl, ...]
    # The minigun implementations; every other implementation is a baseline of each.
    subjects: tuple[str, ...]
    full: Params
    quick: Params
    # The number of units the unit counts (items, runs) for the given parameters.
    count: Callable[[Params], int]
    expected: Callable[[Params], int]
    # "items/s": count / seconds, higher is better; "ms": seconds * 1000 / count.
    unit: str = "items/s"
    # Wall time of a perfect run, from the parameters and the best times (seconds by
    # implementation), for an "x ideal" column; None: no such column.
    ideal_seconds: Callable[[Params, Mapping[str, float]], float | None] | None = None
    # Called once in the parent before any measurement (for example to calibrate).
    prepare: Callable[[Params], Params] | None = None
    # Extra lines under the table, from the measurements by implementation.
    notes: Callable[[Params, Mapping[str, Measurement]], list[str]] | None = None
    # The parameters one implementation runs with, where they differ (MEM: N and 10N).
    adjust: Callable[[Params, str], Params] | None = None

    def impl(self, name: str) -> Impl:
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise KeyError(f"{self.key} has no implementation {name!r}")

    def params_for(self, params: Params, impl: str) -> Params:
        return params if self.adjust is None else self.adjust(params, impl)


@dataclass
class Measurement:
    """What the runs of one implementation gave."""

    status: str = OK
    runs: list[float] = field(default_factory=list)
    detail: str = ""
    max_rss_mb: float | None = None
    children_pss_mb: float | None = None

    @property
    def best(self) -> float | None:
        return min(self.runs) if self.runs else None


def round_by_round(subject: Measurement, baseline: Measurement) -> list[float]:
    """The subject's speed-up over the baseline in each round (the baseline's time over the
    subject's), sorted. The runner alternates implementations within a round, so the two
    times of a round were taken at most a round apart, where the two best times may come
    from the first round and the last: on a shared machine whose speed drifts, a round's
    ratio compares like with like."""
    if subject.status != OK or baseline.status != OK:
        return []
    return sorted(b / s for s, b in zip(subject.runs, baseline.runs, strict=False))


def minigun_impl(name: str, run: Callable[[Params], int], processes: bool = False) -> Impl:
    """A minigun implementation: it imports minigun inside ``run`` (so that no baseline's
    peak RSS includes minigun), and its process imports it before the clock starts."""
    return Impl(name, run, imports=("minigun",), processes=processes)


def start_ray(params: Params) -> None:
    """A local Ray with one CPU per worker (``params["cpus"]``, else the machine's), its
    worker processes started, as a user's Ray would be before their job runs."""
    import os
    import sys

    import ray

    paths = [p for p in sys.path if p and os.path.isdir(p)]
    ray.init(
        num_cpus=params.get("cpus") or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}},
    )
    ray.get(ray.remote(_ready).remote())


def _ready() -> bool:
    return True


def minigun_on_ray(name: str, run: Callable[[Params], int]) -> Impl:
    """A minigun implementation on Ray: Ray is started before the clock (it is a peer to
    install, like the libraries minigun is compared with)."""
    return Impl(name, run, requires="ray", imports=("minigun", "ray"), setup=start_ray)
