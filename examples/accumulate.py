"""Keyed batching with a timed flush: python examples/accumulate.py"""

import threading
import time
from collections.abc import Iterator
from typing import Any

import minigun as mg


class Mailer(mg.Task):
    """Batch outgoing mails per domain: a domain's batch leaves when it holds 3 mails,
    when its oldest mail has waited 0.2 s, or at the end of the stream."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, list[int]]] = []
        self.idle = threading.Event()

    @mg.producer
    def mails(self) -> Iterator[dict[str, Any]]:
        for n in range(7):
            yield {"to": f"user{n}@{'a.com' if n % 2 else 'b.org'}", "n": n}
        self.idle.wait(2)  # the producer goes quiet; max_wait still flushes
        yield {"to": "late@a.com", "n": 99}

    @mg.accumulator(max_size=3, max_wait=0.2, key=lambda mail: mail["to"].split("@")[1])
    def per_domain(self, mails: list[dict[str, Any]]) -> list[int]:
        return [m["n"] for m in mails]

    @mg.consumer
    def send(self, batch: list[int]) -> None:
        self.sent.append((time.monotonic(), batch))
        if len(self.sent) == 3:  # the two full batches and the timed-out one
            self.idle.set()


if __name__ == "__main__":
    job = Mailer()
    job.run()
    batches = [b for _, b in job.sent]
    print(batches)
    assert sorted(n for b in batches for n in b) == [0, 1, 2, 3, 4, 5, 6, 99]
    assert all(len(b) <= 3 for b in batches)
    assert [6] in batches, "the lone b.org mail left on the timer, not at the end"
