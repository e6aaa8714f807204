"""Async stages: python examples/async_fetch.py"""

import asyncio
import time
from collections.abc import Iterator

import minigun as mg


class Crawl(mg.Task):
    """Fetch 100 "pages" that each take 50 ms, 25 at a time."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    @mg.producer
    def urls(self) -> Iterator[str]:
        for n in range(100):
            yield f"https://example.invalid/page/{n}"

    @mg.processor(concurrency=25)  # async def implies strategy="async"
    async def fetch(self, url: str) -> tuple[str, int]:
        await asyncio.sleep(0.05)  # stands in for a network round trip
        return url, len(url) * 100

    @mg.consumer
    def save(self, page: tuple[str, int]) -> None:
        url, size = page
        self.sizes[url] = size


if __name__ == "__main__":
    job = Crawl()
    started = time.monotonic()
    result = job.run()
    took = time.monotonic() - started
    print(result.summary())
    print(f"100 pages x 50 ms in {took:.2f} s")
    assert len(job.sizes) == 100
    assert took < 2.5, "the fetches did not overlap"
