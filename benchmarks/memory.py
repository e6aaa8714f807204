"""Memory: the main process's peak RSS for W1 and W4 at N and at 10N items.

Bounded queues should keep minigun's peak flat as the input grows; the plain loop is the
floor (an interpreter and the work, nothing else). The notes give 10N / N per pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping

from benchmarks import w1_overhead, w4_batching
from benchmarks.workload import Impl, Measurement, Params, Workload, minigun_impl

IMPLS = (
    minigun_impl("minigun W1 at N", w1_overhead.minigun),
    minigun_impl("minigun W1 at 10N", w1_overhead.minigun),
    Impl("plain loop W1 at N", w1_overhead.plain_loop),
    Impl("plain loop W1 at 10N", w1_overhead.plain_loop),
    minigun_impl("minigun W4 at N", w4_batching.minigun),
    minigun_impl("minigun W4 at 10N", w4_batching.minigun),
    Impl("plain loop W4 at N", w4_batching.plain_loop),
    Impl("plain loop W4 at 10N", w4_batching.plain_loop),
)


def _expected(params: Params) -> int:
    n = params["n"]
    return int(n * (n - 1) if params["workload"] == "W1" else n)


def _adjust(params: Params, impl: str) -> Params:
    """'minigun W4 at 10N' runs W4 with 10 * n items."""
    n = params["n"] * 10 if impl.endswith("10N") else params["n"]
    return {**params, "n": n, "workload": impl.split()[-3]}


def _notes(params: Params, results: Mapping[str, Measurement]) -> list[str]:
    notes = []
    for pipeline in ("minigun W1", "plain loop W1", "minigun W4", "plain loop W4"):
        at_n = results[f"{pipeline} at N"].max_rss_mb
        at_10n = results[f"{pipeline} at 10N"].max_rss_mb
        if at_n and at_10n:
            notes.append(
                f"{pipeline}: peak RSS {at_n:.1f} MB at N, {at_10n:.1f} MB at 10N"
                f" (10N / N = {at_10n / at_n:.2f})"
            )
    return notes


WORKLOADS = (
    Workload(
        key="MEM",
        module=__name__,
        title="peak RSS of the main process, W1 and W4 at N and 10N items",
        impls=IMPLS,
        subjects=(),
        full={"n": 200_000, "batch": 1000},
        quick={"n": 1_000, "batch": 100},
        count=lambda params: params["n"],
        expected=_expected,
        adjust=_adjust,
        notes=_notes,
    ),
)
