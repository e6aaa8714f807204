"""Every routing form, in one runnable file: python examples/routing.py"""

from collections import Counter
from collections.abc import Iterator

import minigun as mg


class Sequential(mg.Task):
    """Default routing: each stage feeds the next one defined after it."""

    def __init__(self) -> None:
        self.out: list[int] = []

    @mg.producer
    def numbers(self) -> Iterator[int]:
        yield from range(5)

    @mg.processor
    def square(self, n: int) -> int:
        return n * n

    @mg.consumer
    def collect(self, n: int) -> None:
        self.out.append(n)


class FanOutFanIn(mg.Task):
    """to=[...] fans out (each item to both, by default); from_=[...] fans in."""

    def __init__(self) -> None:
        self.out: Counter[int] = Counter()

    @mg.producer(to=["tens", "hundreds"])
    def numbers(self) -> Iterator[int]:
        yield from range(3)

    @mg.processor
    def tens(self, n: int) -> int:
        return n * 10

    @mg.processor
    def hundreds(self, n: int) -> int:
        return n * 100

    @mg.consumer(from_=["tens", "hundreds"])  # finishes after both upstreams finished
    def collect(self, n: int) -> None:
        self.out[n] += 1


class RoundRobin(mg.Task):
    """routing="round_robin": each item goes to exactly one downstream stage."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    @mg.producer(to=["left", "right"], routing="round_robin")
    def numbers(self) -> Iterator[int]:
        yield from range(10)

    @mg.consumer
    def left(self, n: int) -> None:
        self.seen["left"] += 1

    @mg.consumer
    def right(self, n: int) -> None:
        self.seen["right"] += 1


class Dynamic(mg.Task):
    """self.emit(value, to="name") picks one of the stage's declared downstreams."""

    def __init__(self) -> None:
        self.evens: list[int] = []
        self.odds: list[int] = []

    @mg.producer
    def numbers(self) -> Iterator[int]:
        yield from range(6)

    @mg.processor(to=["even", "odd"])
    def split(self, n: int) -> None:
        self.emit(n, to="even" if n % 2 == 0 else "odd")

    @mg.consumer
    def even(self, n: int) -> None:
        self.evens.append(n)

    @mg.consumer
    def odd(self, n: int) -> None:
        self.odds.append(n)


class AddOne(mg.Task):
    @mg.processor
    def plus_one(self, n: int) -> int:
        return n + 1


class Nested(mg.Task):
    """A nested pipeline is one stage: items enter at its first stage(s), leave from its last."""

    def __init__(self) -> None:
        self.out: list[int] = []

    @mg.producer
    def numbers(self) -> Iterator[int]:
        yield from range(3)

    inc = mg.nested(AddOne, name="inc")

    @mg.consumer
    def collect(self, n: int) -> None:
        self.out.append(n)


def builder_fan_out() -> Counter[str]:
    """The builder API takes the same options."""
    got: Counter[str] = Counter()
    p = mg.Pipeline("builder")
    p.producer(lambda: range(4), name="numbers", to=["a", "b"])
    p.consumer(lambda n: got.update(["a"]), name="a")
    p.consumer(lambda n: got.update(["b"]), name="b")
    p.run()
    return got


if __name__ == "__main__":
    sequential = Sequential()
    sequential.run()
    assert sequential.out == [0, 1, 4, 9, 16]
    print("sequential:", sequential.out)

    fan = FanOutFanIn()
    fan.run()
    assert fan.out == Counter({0: 2, 10: 1, 20: 1, 100: 1, 200: 1})
    print("fan-out/fan-in:", sorted(fan.out.elements()))

    rr = RoundRobin()
    rr.run()
    assert rr.seen == Counter(left=5, right=5)
    print("round robin:", dict(rr.seen))

    dynamic = Dynamic()
    dynamic.run()
    assert (dynamic.evens, dynamic.odds) == ([0, 2, 4], [1, 3, 5])
    print("dynamic:", dynamic.evens, dynamic.odds)

    nested = Nested()
    result = nested.run()
    assert nested.out == [1, 2, 3]
    print("nested:", nested.out, "stats keys:", list(result.stats))

    assert builder_fan_out() == Counter(a=4, b=4)
    print("builder fan-out: ok")
    print(Dynamic.to_mermaid())
