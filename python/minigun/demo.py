"""The bundled example job (``python -m minigun demo``).

It reads synthetic web-server log lines, parses them on threads, batches them, and
tallies each batch in a forked child (copy-on-write: the batch is never pickled), sending
per-batch totals back to the parent, which merges them.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import minigun as mg

PATHS = ["/", "/login", "/search", "/cart", "/checkout", "/api/items", "/api/users"]
STATUSES = [200, 200, 200, 200, 301, 404, 500]


def fake_log_line(rng: random.Random, n: int) -> str:
    ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
    return (f'{ip} - - [28/Nov/2026:03:{n % 60:02d}:00] "GET {rng.choice(PATHS)} HTTP/1.1" '
            f"{rng.choice(STATUSES)} {rng.randrange(100, 50_000)}")


class LogReport(mg.Task):
    """Count requests, errors and bytes per path over a stream of access-log lines."""

    max_processes = max(2, min(os.cpu_count() or 2, 8))

    def __init__(self, records: int = 200_000, seed: int = 7) -> None:
        self.records = records
        self.seed = seed
        self.totals: Counter[str] = Counter()

    @mg.producer
    def read_lines(self):
        rng = random.Random(self.seed)
        for n in range(self.records):
            yield fake_log_line(rng, n)

    @mg.processor(threads=2)
    def parse(self, line: str):
        head, _, tail = line.partition('"GET ')
        path, _, rest = tail.partition(" HTTP/1.1\" ")
        status, size = rest.split()
        return path, int(status), int(size)

    batch = mg.accumulator("batch", max_size=4_000)

    @mg.processor(strategy="spawn_fork")
    def tally(self, records):
        counts: Counter[str] = Counter()
        for path, status, size in records:
            counts[f"{path} requests"] += 1
            counts[f"{path} bytes"] += size
            if status >= 500:
                counts[f"{path} errors"] += 1
        return counts

    @mg.consumer
    def merge(self, counts: Counter[str]) -> None:
        self.totals.update(counts)


def main(records: int = 200_000) -> int:
    job = LogReport(records)
    result = job.run()
    print(f"minigun demo: {records:,} log lines\n")
    print(f"{'path':<12} {'requests':>9} {'errors':>7} {'MB':>8}")
    for path in PATHS:
        t = job.totals
        print(f"{path:<12} {t[f'{path} requests']:>9,} {t[f'{path} errors']:>7,} "
              f"{t[f'{path} bytes'] / 1e6:>8.1f}")
    print()
    print(result.summary())
    assert sum(job.totals[f"{p} requests"] for p in PATHS) == records
    return 0
