"""Property tests (hypothesis) of the core delivery guarantees: every item is delivered
exactly once through chains of any length and width, order is kept by single-threaded
chains, batching neither loses nor duplicates, and random DAGs with broadcast and
round-robin fan-out deliver exactly the multiset their edges imply."""

import collections
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minigun as mg

PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class _Sink:
    def __init__(self):
        self.lock = threading.Lock()
        self.items = []

    def add(self, x):
        with self.lock:
            self.items.append(x)


def _make_stage_fn(style):
    """A +1 stage written in one of the three emission styles."""
    if style == "return":

        def fn(x):
            return x + 1

    elif style == "yield":

        def fn(x):
            yield x + 1

    else:  # "emit"

        def fn(x):
            mg.emit(x + 1)

    return fn


@pytest.mark.timeout(120)
@PROPERTY_SETTINGS
@given(
    n_items=st.integers(0, 40),
    stages=st.lists(
        st.tuples(st.integers(1, 4), st.sampled_from(["return", "yield", "emit"])),
        min_size=1,
        max_size=5,
    ),
    sink_threads=st.integers(1, 3),
)
def test_every_item_delivered_exactly_once_through_a_chain(n_items, stages, sink_threads):
    sink = _Sink()
    p = mg.Pipeline("chain")
    p.producer(lambda: iter(range(n_items)), name="gen")
    for i, (threads, style) in enumerate(stages):
        p.processor(_make_stage_fn(style), name=f"s{i}", threads=threads)
    p.consumer(lambda x: sink.add(x), name="sink", threads=sink_threads)
    result = p.run()
    assert result.status == "ok"
    k = len(stages)
    assert collections.Counter(sink.items) == collections.Counter(x + k for x in range(n_items))
    assert result.stats["sink"].items_in == n_items
    for i in range(k):
        assert result.stats[f"s{i}"].items_in == n_items
        assert result.stats[f"s{i}"].items_out == n_items


@pytest.mark.timeout(120)
@PROPERTY_SETTINGS
@given(
    n_items=st.integers(0, 60),
    styles=st.lists(st.sampled_from(["return", "yield", "emit"]), min_size=1, max_size=5),
    strategy=st.sampled_from(["threads", "inline"]),
)
def test_single_threaded_chain_preserves_order(n_items, styles, strategy):
    sink = _Sink()
    p = mg.Pipeline("ordered")
    p.producer(lambda: iter(range(n_items)), name="gen")
    for i, style in enumerate(styles):
        p.processor(_make_stage_fn(style), name=f"s{i}", strategy=strategy)
    p.consumer(lambda x: sink.add(x), name="sink")
    p.run()
    assert sink.items == [x + len(styles) for x in range(n_items)]


@pytest.mark.timeout(120)
@PROPERTY_SETTINGS
@given(
    n_items=st.integers(0, 80),
    max_size=st.integers(1, 12),
    n_keys=st.one_of(st.none(), st.integers(1, 5)),
    upstream_threads=st.integers(1, 3),
    max_all=st.integers(1, 30),
    check_interval=st.integers(1, 10),
)
def test_batching_never_loses_or_duplicates(
    n_items, max_size, n_keys, upstream_threads, max_all, check_interval
):
    sink = _Sink()
    p = mg.Pipeline(
        "batching",
        config={"accumulator_max_all": max_all, "accumulator_check_interval": check_interval},
    )
    p.producer(lambda: iter(range(n_items)), name="gen")
    p.processor(lambda x: x, name="work", threads=upstream_threads)
    options = {"max_size": max_size}
    if n_keys is not None:
        options["key"] = lambda x: x % n_keys
    p.accumulator(name="batch", **options)
    p.consumer(lambda b: sink.add(list(b)), name="sink")
    p.run()

    batches = sink.items
    assert all(1 <= len(b) <= max_size for b in batches)
    flat = [x for b in batches for x in b]
    assert sorted(flat) == list(range(n_items))
    if n_keys is not None:
        assert all(len({x % n_keys for x in b}) == 1 for b in batches)


@pytest.mark.timeout(120)
@PROPERTY_SETTINGS
@given(n_items=st.integers(0, 60), max_size=st.integers(1, 12))
def test_batches_are_consecutive_chunks_in_a_single_threaded_chain(n_items, max_size):
    sink = _Sink()
    p = mg.Pipeline("chunks")
    p.producer(lambda: iter(range(n_items)), name="gen")
    p.accumulator(name="batch", max_size=max_size)
    p.consumer(lambda b: sink.add(list(b)), name="sink")
    p.run()
    expected = [list(range(i, min(i + max_size, n_items))) for i in range(0, n_items, max_size)]
    assert sink.items == expected


@st.composite
def dags(draw):
    n_nodes = draw(st.integers(1, 5))
    parents = []
    for i in range(n_nodes):
        candidates = ["src"] + [f"n{j}" for j in range(i)]
        parents.append(
            draw(
                st.lists(
                    st.sampled_from(candidates),
                    min_size=1,
                    max_size=min(3, len(candidates)),
                    unique=True,
                )
            )
        )
    names = ["src"] + [f"n{i}" for i in range(n_nodes)]
    routing = {name: draw(st.sampled_from(["broadcast", "round_robin"])) for name in names}
    threads = [draw(st.integers(1, 3)) for _ in range(n_nodes)]
    n_items = draw(st.integers(0, 12))
    return n_nodes, parents, routing, threads, n_items


def _make_node(name, record):
    def node(item):
        x, sender = item
        record.add((x, sender, name))
        return (x, name)

    return node


@pytest.mark.timeout(180)
@PROPERTY_SETTINGS
@given(dags())
def test_random_dag_delivers_exactly_the_implied_multiset(dag):
    n_nodes, parents, routing, threads, n_items = dag
    record = _Sink()
    p = mg.Pipeline("dag")

    def src():
        for x in range(n_items):
            yield (x, "src")

    p.producer(src, name="src", routing=routing["src"])
    for i in range(n_nodes):
        name = f"n{i}"
        p.processor(
            _make_node(name, record),
            name=name,
            from_=parents[i],
            threads=threads[i],
            routing=routing[name],
        )
    assert p.run().status == "ok"

    names = ["src"] + [f"n{i}" for i in range(n_nodes)]
    parents_of = {f"n{i}": set(parents[i]) for i in range(n_nodes)}
    children = {u: [c for c in names[1:] if u in parents_of[c]] for u in names}

    # every delivery travelled a declared edge
    for _x, sender, receiver in record.items:
        assert sender in parents_of[receiver], (sender, receiver)

    received = collections.Counter((name, x) for x, _, name in record.items)
    on_edge = collections.Counter((s, r, x) for x, s, r in record.items)
    for x in range(n_items):
        for u in names:
            got = 1 if u == "src" else received[(u, x)]
            kids = children[u]
            if not kids:
                continue
            if routing[u] == "broadcast" or len(kids) == 1:
                for c in kids:
                    assert on_edge[(u, c, x)] == got, (u, c, x)
            else:
                assert sum(on_edge[(u, c, x)] for c in kids) == got, (u, x)

    # with broadcast everywhere, each node sees each item once per path from src
    if all(routing[u] == "broadcast" for u in names):
        paths = {"src": 1}
        for i in range(n_nodes):
            paths[f"n{i}"] = sum(paths[u] for u in parents[i])
        for i in range(n_nodes):
            for x in range(n_items):
                assert received[(f"n{i}", x)] == paths[f"n{i}"]
