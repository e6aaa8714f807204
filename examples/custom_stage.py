"""A custom Stage with per-worker state, and the builder API: python examples/custom_stage.py"""

from typing import Any

import minigun as mg


class Dedupe(mg.Stage):
    """Drops repeated items. Each worker has its own copy, so use one worker (the
    default) when every duplicate must be caught."""

    def open(self) -> None:
        self.seen: set[Any] = set()

    def process(self, item: Any) -> Any:
        if item not in self.seen:
            self.seen.add(item)
            return item
        return None

    def close(self) -> None:
        self.emit(("distinct", len(self.seen)))  # close may emit, e.g. to flush


if __name__ == "__main__":
    out: list[Any] = []
    p = mg.Pipeline("dedupe")
    p.producer(lambda: [3, 1, 3, 2, 1], name="numbers")
    p.add(Dedupe("dedupe"))
    p.consumer(out.append, name="collect")
    p.run()
    print(out)
    assert out == [3, 1, 2, ("distinct", 3)]
