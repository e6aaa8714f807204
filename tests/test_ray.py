"""The Ray strategies (``ray``, ``spawn_ray``) beyond the conformance matrix: the contract
in the class DSL, a killed actor, errors with their remote traceback, what a cancelled run
leaves on Ray, a "cluster" started with ``ray start --head``, and the message when Ray is
not installed.

They run on the test session's local Ray (the ``ray_session`` fixture, marker ``ray``);
the cluster test starts one of its own in separate processes.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
from _mg_helpers import minigun_ray_actors, subprocess_env, wait_until
from conformance.forms import worker_events

import minigun as mg
from minigun.ray_executor import SETTLE

try:
    import ray_jobs as jobs
except (ImportError, mg.UnsupportedStrategy):  # no Ray here: the Ray tests skip
    jobs = None


def _opened_and_closed(folder):
    """The worker tokens a stage of ray_jobs.RecordsWorkers recorded in ``folder``, opened
    and closed; the records are then cleared for the next run."""
    tokens = worker_events(str(folder), "opens"), worker_events(str(folder), "closes")
    for kind in ("opens", "closes"):
        (folder / kind).unlink(missing_ok=True)
    return tokens


def _pipeline(fn, strategy="ray", **options):
    got, failed = [], []
    p = mg.Pipeline("p")
    p.producer(lambda: range(10), name="source")
    p.processor(fn, name="work", strategy=strategy, **options)
    p.consumer(got.append, name="sink")
    return p, got, failed


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
@pytest.mark.skipif(jobs is None, reason="needs ray (the [ray] extra; not on 3.13t)")
class TestOnRay:
    def test_retries_discard_a_failed_attempts_emits_and_routes_hold(self):
        job = jobs.Flaky(n=20, fails=1)
        result = job.run()
        assert result.status == "ok"
        assert all(v[0] != "poison" for v in job.out + job.odd), "a failed attempt emitted"
        assert sorted(v[1] for v in job.out) == list(range(0, 20, 2))
        assert sorted(v[1] for v in job.odd) == list(range(1, 20, 2))
        assert os.getpid() not in {v[2] for v in job.out + job.odd}, "the actors ran them"
        assert result.stats["work"].retries == 20 and job.errors == []
        assert minigun_ray_actors() == [], "the run's actors are gone"

    def test_items_failing_every_attempt_reach_on_error_with_the_item(self):
        job = jobs.Flaky(n=6, fails=99)
        result = job.run()
        assert result.status == "ok"
        assert sorted(job.errors) == [("Refused", x, "work") for x in range(6)]
        assert job.out == [] and job.odd == []
        assert result.stats["work"].errors == 6 and result.stats["work"].retries == 12

    @pytest.mark.parametrize("strategy", ["ray", "spawn_ray"])
    def test_an_error_arrives_as_itself_with_the_remote_traceback(self, strategy):
        p, _, _ = _pipeline(jobs.crash, strategy)
        with pytest.raises(mg.PipelineError) as info:
            p.run()
        cause = info.value.__cause__
        assert type(cause) is jobs.Refused, "Ray's wrapper is unwrapped"
        assert "in crash" in cause.traceback_text
        assert any("Ray" in note for note in getattr(cause, "__notes__", []))

    @pytest.mark.parametrize("strategy", ["ray", "spawn_ray"])
    def test_an_item_ray_cannot_serialize_fails_alone_with_the_item(self, strategy):
        lock = threading.Lock()
        failed, got = [], []
        p = mg.Pipeline("p")
        p.producer(lambda: [1, lock, 3], name="source")
        p.processor(jobs.slow, name="work", strategy=strategy)
        p.consumer(got.append, name="sink")
        p.on_error(mg.WorkerError)(lambda error, item, stage: failed.append((item, str(error))))
        assert p.run().status == "ok"
        assert sorted(got) == [1, 3]
        [(item, message)] = failed
        assert item is lock and "cannot be pickled" in message and "Ray" in message
        assert minigun_ray_actors() == []

    def test_a_killed_actor_fails_its_chunk_and_the_run_goes_on_with_a_fresh_one(self):
        failed = []
        got = []
        p = mg.Pipeline("p")
        p.producer(lambda: range(8), name="source")
        p.processor(jobs.kill_my_actor_at_3, name="work", strategy="ray")
        p.consumer(got.append, name="sink")
        p.on_error(mg.WorkerError)(lambda error, item, stage: failed.append((item, str(error))))
        began = time.monotonic()
        assert p.run().status == "ok"
        # The bound leaves room for starting two actors on a loaded machine (one run took
        # 5 s in CI; 1.5 s is usual); a run that waited for the killed item takes 60 s.
        assert time.monotonic() - began < 20, "a dead actor is noticed at once, not waited for"
        lost = [item for item, _ in failed]
        assert 3 in lost and "Ray actor" in failed[0][1]
        assert sorted(got + lost) == list(range(8)), "every item once: done, or failed"
        assert minigun_ray_actors() == []

    def test_items_ray_cannot_serialize_still_fail_when_their_chunks_actor_dies(self):
        # Every other item is a lock, and from item 30 on every item kills its actor, so
        # chunks that lose their actor hold locks too: those fail for what they are, the
        # chunk's other items with the actor.
        failed, got = [], []
        locks = [threading.Lock() for _ in range(40)]
        items = [x for pair in zip(range(40), locks, strict=True) for x in pair]
        p = mg.Pipeline("p")
        p.producer(lambda: items, name="source")
        p.processor(jobs.kill_my_actor_from_30, name="work", strategy="ray")
        p.consumer(got.append, name="sink")
        p.on_error(mg.WorkerError)(lambda error, item, stage: failed.append((item, str(error))))
        assert p.run().status == "ok"
        refused = [item for item, message in failed if "cannot be pickled" in message]
        died = [item for item, message in failed if "Ray actor" in message]
        assert set(died) >= set(range(30, 40))
        assert sorted(map(id, refused)) == sorted(map(id, locks)), "every lock fails once"
        assert sorted(got + died) == list(range(40)), "every other item once"

    @pytest.mark.parametrize("strategy", ["ray", "spawn_ray"])
    def test_cancel_ends_the_runs_actors_and_tasks(self, strategy):
        p = mg.Pipeline("p")
        p.producer(lambda: itertools.count(), name="source")
        p.processor(jobs.slow, name="work", strategy=strategy, actors=2)
        got = []
        p.consumer(got.append, name="sink")
        run = p.start()
        assert wait_until(lambda: len(got) >= 3, timeout=20)
        began = time.monotonic()
        run.cancel()
        assert run.wait(timeout=10).status == "cancelled"
        assert time.monotonic() - began < 2
        assert wait_until(lambda: minigun_ray_actors() == [], timeout=5), minigun_ray_actors()

    @pytest.mark.parametrize("strategy", ["ray", "spawn_ray"])
    def test_a_cancelled_worker_closes_before_the_run_ends(self, strategy, tmp_path):
        # Ray cancels a task with a KeyboardInterrupt at any point of it: one that lands in
        # open() or close() must not leave an opened worker unclosed, and the run must not
        # end before the task has closed its worker. An actor is cancelled in its first
        # chunk, before it ever replied: it has opened its worker all the same.
        p = mg.Pipeline("p")
        p.producer(lambda: itertools.count(), name="source")
        p.add(jobs.SlowToOpenAndClose("work", folder=str(tmp_path), strategy=strategy))
        p.consumer(lambda item: None, name="sink")
        # The cancel lands, after the first open() began: in open() (0.3 s), in the item
        # (0.3 to 0.35 s), after it (an actor's chunk goes on; a task closes, 0.35 to
        # 0.65 s). A stopping run waits SETTLE before it cancels a task.
        settle = SETTLE if strategy == "spawn_ray" else 0.0
        for lands_at in (0.1, 0.32, 0.5):
            run = p.start()
            assert wait_until(lambda: (tmp_path / "opens").exists(), timeout=20)
            time.sleep(max(0.0, lands_at - settle))
            run.cancel()
            assert run.wait(timeout=10).status == "cancelled"
            opens, closes = _opened_and_closed(tmp_path)
            assert opens, f"cancelled at {lands_at} s: no worker opened"
            assert sorted(closes) == sorted(opens), f"cancelled at {lands_at} s"

    def test_an_actor_cancelled_as_it_comes_up_closes_whatever_it_opened(self, tmp_path):
        # The run is cancelled once its actor exists, while it starts; the actor comes up
        # `late` seconds after its process does, around when a stopping run stopped waiting
        # for an actor that is not up. An actor that is not up was sent nothing and opened
        # nothing; one that is up may be opening its worker, and must close it.
        for late in [0.15 + 0.02 * step for step in range(13)]:
            p = mg.Pipeline("p")
            p.producer(lambda: itertools.count(), name="source")
            p.add(jobs.LateToComeUp("work", folder=str(tmp_path), late=late, strategy="ray"))
            p.consumer(lambda item: None, name="sink")
            run = p.start()
            assert wait_until(lambda: minigun_ray_actors() != [], timeout=20)
            began = time.monotonic()
            run.cancel()
            assert run.wait(timeout=10).status == "cancelled"
            assert time.monotonic() - began < 2, f"actors {late} s late"
            opens, closes = _opened_and_closed(tmp_path)
            assert sorted(closes) == sorted(opens), f"actors {late} s late"
        assert wait_until(lambda: minigun_ray_actors() == [], timeout=5), minigun_ray_actors()


def test_without_ray_the_strategy_is_refused_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an uninstalled module looks like
    for strategy in ("ray", "spawn_ray"):
        with pytest.raises(mg.UnsupportedStrategy) as info:
            mg.processor(strategy=strategy)(_double)
        assert 'pip install "minigun-pipelines[ray]"' in str(info.value)


def _double(x):
    return 2 * x


_CLUSTER_JOB = """
import os, sys
import minigun as mg

def tag(x):
    return (x, os.getpid())

if __name__ == "__main__":
    got = []
    p = mg.Pipeline("p", config={
        "ray_address": "auto",
        "ray_runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
    })
    p.producer(lambda: range(50), name="source")
    p.processor(tag, name="work", strategy="ray", actors=2)
    p.consumer(got.append, name="sink")
    p.run()
    import ray  # after the run: the job itself never imports Ray
    print("items", sorted(x for x, _ in got) == list(range(50)))
    print("remote", os.getpid() not in {pid for _, pid in got})
    print("connected", ray.is_initialized())
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.skipif(jobs is None, reason="needs ray (the [ray] extra; not on 3.13t)")
def test_a_job_runs_on_a_cluster_started_with_ray_start(tmp_path):
    """``ray start --head`` as separate processes, then the job with ray_address="auto".
    ``--block`` keeps the head in the foreground, so ending it ends only this cluster
    (``ray stop`` would end every Ray on the machine, the test session's too)."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    # Ray's Unix sockets live under its temp dir, whose path must stay short (107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="mgray-", dir="/tmp")
    env = {**subprocess_env(), "RAY_ADDRESS": ""}
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--num-cpus=2", f"--port={port}"]
        + ["--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert head.stdout is not None
        said = []
        while not any("Ray runtime started" in line for line in said):
            line = head.stdout.readline()
            assert line, "ray start ended: " + "".join(said[-30:])
            said.append(line)
        script = tmp_path / "cluster_job.py"
        script.write_text(textwrap.dedent(_CLUSTER_JOB))
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            # "auto" finds the cluster through RAY_ADDRESS, as `ray start` tells users.
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "items True" in done.stdout and "remote True" in done.stdout
        assert "connected False" in done.stdout, "the run disconnects what it connected"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
