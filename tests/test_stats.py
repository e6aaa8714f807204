"""What a run reports: RunResult.to_dict(), the summary and per-item latencies."""

from __future__ import annotations

import asyncio
import json
import time

import minigun as mg


class Slowest(mg.Task):
    @mg.producer
    def numbers(self):
        yield from range(2_000)

    @mg.processor(threads=2)
    def double(self, n):
        return n * 2

    batch = mg.accumulator("batch", max_size=50)

    @mg.consumer
    def save(self, batch):
        time.sleep(0.005)


def test_to_dict_is_json_and_has_every_stage():
    result = Slowest().run()
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["status"] == "ok" and data["duration"] > 0 and data["error"] is None
    assert list(data["stages"]) == ["numbers", "double", "batch", "save"]
    double = data["stages"]["double"]
    assert double["strategy"] == "threads" and double["workers"] == 2
    assert double["items_in"] == double["items_out"] == 2_000
    for key in (
        "errors",
        "retries",
        "latency_p50",
        "latency_p99",
        "throughput",
        "busy_fraction",
        "kind",
        "queue_size",
    ):
        assert key in double
    assert data["stages"]["save"]["items_in"] == 40


def test_bottleneck_is_the_busiest_stage_never_a_routing_only_one():
    result = Slowest().run()
    assert result.stats["batch"].busy_fraction is None  # a body-less accumulator
    assert result.bottleneck == "save"
    assert result.stats["save"].busy_fraction > 0.8
    assert result.to_dict()["bottleneck"] == "save"
    assert "bottleneck: save" in result.summary()


def test_summary_prints_dashes_where_a_figure_does_not_apply():
    summary = Slowest().run().summary()
    lines = summary.splitlines()
    assert lines[3].startswith("numbers")
    row = lines[3].split()
    # stage, strategy (two words: "inline x1"), in, out, ... : a producer takes no items.
    assert row[3] == "-", summary
    assert row[7] == "-" and row[8] == "-", summary  # no latency either
    batch = lines[5].split()
    assert batch[0] == "batch" and batch[-1] == "-", summary  # no busy figure


def test_sub_microsecond_latencies_are_not_zero():
    p = mg.Pipeline("tiny")
    p.producer(lambda: range(50_000), name="numbers")
    p.processor(lambda n: None, name="noop")
    result = p.run()
    p50 = result.stats["noop"].latency_p50
    assert 0 < p50 < 1e-3
    line = next(x for x in result.summary().splitlines() if x.startswith("noop"))
    assert "0µs" not in line.replace(".0µs", "")  # never a bare 0µs
    assert "µs" in line or "ns" in line


def test_failed_run_result_has_a_summary_and_dict():
    p = mg.Pipeline("bad")
    p.producer(lambda: range(3), name="numbers")

    @p.processor
    def boom(n):
        raise ValueError(n)

    try:
        p.run()
    except mg.PipelineError as exc:
        data = exc.result.to_dict()
        assert data["status"] == "failed" and "ValueError" in data["error"]
        assert exc.result.summary().startswith("run failed")
    else:
        raise AssertionError("the run should fail")


def test_async_latency_is_per_item():
    class Fetch(mg.Task):
        @mg.producer
        def urls(self):
            yield from range(40)

        @mg.processor(concurrency=20)
        async def fetch(self, n):
            await asyncio.sleep(0.05)
            return n

    stats = Fetch().run().stats["fetch"]
    # Each item takes 50 ms (±19% histogram resolution), whatever the chunk size.
    assert 0.035 < stats.latency_p50 < 0.08, stats.latency_p50
    assert stats.strategy == "async" and stats.workers == 20


def test_live_stats_carry_the_queue_capacity():
    p = mg.Pipeline("live")
    p.producer(lambda: range(10), name="numbers")
    p.processor(lambda n: n, name="work", queue_size=64)
    run = p.start()
    assert run.stats["work"].queue_size == 64
    run.wait(10)
