"""Every routing form, in one runnable file: python examples/routing.py"""

from collections import Counter

import minigun as mg


class Sequential(mg.Task):
    """Default routing: each stage feeds the next one defined after it."""

    def __init__(self):
        self.out = []

    @mg.producer
    def numbers(self):
        yield from range(5)

    @mg.processor
    def square(self, n):
        return n * n

    @mg.consumer
    def collect(self, n):
        self.out.append(n)


class FanOutFanIn(mg.Task):
    """to=[...] fans out (each item to both, by default); from_=[...] fans in."""

    def __init__(self):
        self.out = Counter()

    @mg.producer(to=["tens", "hundreds"])
    def numbers(self):
        yield from range(3)

    @mg.processor
    def tens(self, n):
        return n * 10

    @mg.processor
    def hundreds(self, n):
        return n * 100

    @mg.consumer(from_=["tens", "hundreds"])   # finishes after both upstreams finished
    def collect(self, n):
        self.out[n] += 1


class RoundRobin(mg.Task):
    """routing="round_robin": each item goes to exactly one downstream stage."""

    def __init__(self):
        self.seen = Counter()

    @mg.producer(to=["left", "right"], routing="round_robin")
    def numbers(self):
        yield from range(10)

    @mg.consumer
    def left(self, n):
        self.seen["left"] += 1

    @mg.consumer
    def right(self, n):
        self.seen["right"] += 1


class Dynamic(mg.Task):
    """self.emit(value, to="name") picks one of the stage's declared downstreams."""

    def __init__(self):
        self.evens, self.odds = [], []

    @mg.producer
    def numbers(self):
        yield from range(6)

    @mg.processor(to=["even", "odd"])
    def split(self, n):
        self.emit(n, to="even" if n % 2 == 0 else "odd")

    @mg.consumer
    def even(self, n):
        self.evens.append(n)

    @mg.consumer
    def odd(self, n):
        self.odds.append(n)


class AddOne(mg.Task):
    @mg.processor
    def plus_one(self, n):
        return n + 1


class Nested(mg.Task):
    """A nested pipeline is one stage: items enter at its first stage(s), leave from its last."""

    def __init__(self):
        self.out = []

    @mg.producer
    def numbers(self):
        yield from range(3)

    inc = mg.nested(AddOne, name="inc")

    @mg.consumer
    def collect(self, n):
        self.out.append(n)


def builder_fan_out():
    """The builder API takes the same options."""
    got = Counter()
    p = mg.Pipeline("builder")
    p.producer(lambda: range(4), name="numbers", to=["a", "b"])
    p.consumer(lambda n: got.update(["a"]), name="a")
    p.consumer(lambda n: got.update(["b"]), name="b")
    p.run()
    return got


if __name__ == "__main__":
    job = Sequential()
    job.run()
    assert job.out == [0, 1, 4, 9, 16]
    print("sequential:", job.out)

    job = FanOutFanIn()
    job.run()
    assert job.out == Counter({0: 2, 10: 1, 20: 1, 100: 1, 200: 1})
    print("fan-out/fan-in:", sorted(job.out.elements()))

    job = RoundRobin()
    job.run()
    assert job.seen == Counter(left=5, right=5)
    print("round robin:", dict(job.seen))

    job = Dynamic()
    job.run()
    assert (job.evens, job.odds) == ([0, 2, 4], [1, 3, 5])
    print("dynamic:", job.evens, job.odds)

    job = Nested()
    result = job.run()
    assert job.out == [1, 2, 3]
    print("nested:", job.out, "stats keys:", list(result.stats))

    assert builder_fan_out() == Counter(a=4, b=4)
    print("builder fan-out: ok")
    print(Dynamic.to_mermaid())
