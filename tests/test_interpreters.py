"""The subinterpreter strategies (``interpreters``, ``spawn_interpreter``) beyond the
conformance matrix: the item contract in the class DSL, what is copied into a worker, the
up-front refusals, errors from workers, the ``max_interpreters`` bound, a stage defined in
the script being run, and the message where subinterpreters are unavailable.

The stages live in tests/interpreter_jobs.py: a worker imports them by name.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from _mg_helpers import LeftBehind, subprocess_env

import minigun as mg

try:
    import interpreter_jobs as jobs
except mg.UnsupportedStrategy:  # its Task classes ask for subinterpreters: the tests skip
    jobs = None

BACKPORT = "concurrent.interpreters" if sys.version_info >= (3, 14) else "backports.interpreters"


def _available() -> bool:
    if sys.version_info < (3, 13):
        return False
    try:
        __import__(BACKPORT)
    except ImportError:
        return False
    return True


needs_interpreters = pytest.mark.skipif(
    not _available(), reason=f"needs CPython 3.13+ with {BACKPORT} (the [interpreters] extra)"
)


def _pipeline(fn, strategy="interpreters", **options):
    got = []
    p = mg.Pipeline("p")
    p.producer(lambda: range(10), name="source")
    p.processor(fn, name="work", strategy=strategy, **options)
    p.consumer(got.append, name="sink")
    return p, got


# -- the contract in the class DSL ---------------------------------------------------------


@needs_interpreters
def test_retries_discard_a_failed_attempts_emits_and_routes_hold():
    job = jobs.Flaky(n=20, fails=1)
    result = job.run()
    assert result.status == "ok"
    assert all(v[0] != "poison" for v in job.out + job.odd), "a failed attempt's emits arrived"
    evens = sorted(v[1] for v in job.out)
    odds = sorted(v[1] for v in job.odd)
    assert evens == list(range(0, 20, 2)) and odds == list(range(1, 20, 2))
    assert {v[2] for v in job.out + job.odd} == {os.getpid()}, "one process, no fork"
    assert job.errors == []
    assert result.stats["work"].retries == 20
    assert job.tried == {}, "the parent's Task instance is not the worker's copy"


@needs_interpreters
def test_items_failing_every_attempt_reach_on_error_with_the_item():
    job = jobs.Flaky(n=6, fails=99)
    result = job.run()
    assert result.status == "ok"
    assert sorted(job.errors) == [("Refused", x, "work") for x in range(6)]
    assert job.out == [] and job.odd == [], "a failed item delivers nothing"
    assert result.stats["work"].errors == 6 and result.stats["work"].retries == 12


@needs_interpreters
def test_workers_copy_the_task_as_it_was_and_run_their_worker_hooks_there(tmp_path):
    job = jobs.Snapshot(str(tmp_path))
    job.run()
    assert sorted(v[0] for v in job.got) == list(range(6))
    assert {v[1] for v in job.got} == {"before"}
    main = jobs._interpreter_id()
    used = {v[3] for v in job.got}
    assert main not in used and 1 <= len(used) <= 2, used
    # Each worker's hooks ran in a subinterpreter, before and after its items. An idle
    # subinterpreter of a worker that closed cleanly may serve the next worker (a loaded
    # machine can let one worker take every item before the other opens), but never two
    # workers at once: per subinterpreter, opens and closes alternate.
    events = [line.split(" ", 1) for line in (tmp_path / "worker_hooks").read_text().splitlines()]
    assert 1 <= len(events) // 2 <= 2 and len(events) % 2 == 0, events
    open_in: dict[str, bool] = {}
    for event, connection in events:
        assert open_in.get(connection, False) == (event == "close"), events
        open_in[connection] = event == "open"
    assert not any(open_in.values()), f"a worker never closed: {events}"
    assert not any(c.endswith(f" {main}") for _, c in events), "hooks ran in the parent"
    # An item saw the connection its own subinterpreter's worker opened.
    assert all(v[2] == f"connection in interpreter {v[3]}" for v in job.got), job.got
    assert not hasattr(job, "connection"), "hooks ran in the workers, not in the parent"


@needs_interpreters
@pytest.mark.parametrize("strategy", ["interpreters", "spawn_interpreter"])
def test_a_custom_stage_opens_and_closes_in_each_worker(strategy):
    got = []
    p = mg.Pipeline("p")
    p.producer(lambda: range(10), name="source")
    p.add(jobs.Totals("work", strategy=strategy, interpreters=2))
    p.consumer(got.append, name="sink")
    assert p.run().status == "ok"
    items = sorted(v[1] for v in got if v[0] == "item")
    totals = [v for v in got if v[0] == "total"]
    assert items == list(range(10))
    assert sum(t[1] for t in totals) == sum(range(10))
    if strategy == "spawn_interpreter":
        assert len(totals) == 10, "each item's subinterpreter is a worker of its own"
        assert len({t[2] for t in totals}) == 10
    else:
        assert 1 <= len(totals) <= 2


@needs_interpreters
@pytest.mark.skipif(sys.platform != "linux", reason="timer slack is a Linux setting")
@pytest.mark.parametrize("strategy", ["interpreters", "spawn_interpreter"])
def test_a_subinterpreter_worker_sleeps_with_the_runtimes_1_microsecond_timer_slack(strategy):
    p, got = _pipeline(jobs.timer_slack, strategy)
    p.run()
    assert got == [1_000] * 10


# -- errors ----------------------------------------------------------------------------------


@needs_interpreters
@pytest.mark.parametrize("strategy", ["interpreters", "spawn_interpreter"])
def test_an_error_reaches_the_parent_with_its_type_and_the_workers_traceback(strategy):
    p, _ = _pipeline(jobs.crash, strategy)
    with pytest.raises(mg.PipelineError) as info:
        p.run()
    cause = info.value.__cause__
    assert isinstance(cause, jobs.Refused)
    assert "def crash" in cause.traceback_text or "in crash" in cause.traceback_text
    assert any("subinterpreter" in note for note in getattr(cause, "__notes__", []))


@needs_interpreters
def test_emit_to_a_stage_it_may_not_send_to_raises_the_routing_error_in_the_worker():
    p, _ = _pipeline(jobs.misroute)
    with pytest.raises(mg.PipelineError) as info:
        p.run()
    assert isinstance(info.value.__cause__, mg.RoutingError)
    assert "nowhere" in str(info.value.__cause__)


@needs_interpreters
def test_an_item_that_cannot_be_pickled_fails_alone_with_the_item():
    lock = threading.Lock()
    failed, got = [], []
    p = mg.Pipeline("p")
    p.producer(lambda: [1, lock, 3], name="source")
    p.processor(jobs.slow, name="work", strategy="interpreters")
    p.consumer(got.append, name="sink")
    p.on_error(mg.WorkerError)(lambda error, item, stage: failed.append((item, str(error))))
    assert p.run().status == "ok"
    assert sorted(got) == [1, 3]
    [(item, message)] = failed
    assert item is lock and "cannot be pickled" in message and "subinterpreter" in message


@needs_interpreters
def test_a_worker_that_cannot_import_the_stages_module_names_it(tmp_path):
    (tmp_path / "vanishing_stage.py").write_text("def double(x):\n    return 2 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import vanishing_stage
    finally:
        sys.path.remove(str(tmp_path))
    try:
        p, _ = _pipeline(vanishing_stage.double)
        with pytest.raises(mg.PipelineError) as info:
            p.run()
    finally:
        sys.modules.pop("vanishing_stage", None)
    cause = info.value.__cause__
    assert isinstance(cause, mg.WorkerError), cause
    assert "vanishing_stage" in str(cause) and "could not load" in str(cause)


def _lambda_stage():
    return lambda x: x


def _closure_stage():
    factor = 3

    def triple(x):
        return factor * x

    return triple


@needs_interpreters
@pytest.mark.parametrize(
    ("make", "says"),
    [(_lambda_stage, "is a lambda"), (_closure_stage, "defined inside a function")],
    ids=["lambda", "closure"],
)
def test_a_stage_a_subinterpreter_cannot_import_is_refused_up_front(make, says):
    p, got = _pipeline(make())
    with pytest.raises(mg.DefinitionError) as info:
        p.run()
    message = str(info.value)
    assert "'work'" in message and says in message and "module level" in message
    assert got == []


@needs_interpreters
def test_a_local_stage_class_and_an_unpicklable_task_are_refused_up_front():
    class Local(mg.Stage):
        def process(self, item):
            return item

    p = mg.Pipeline("p")
    p.producer(lambda: range(3), name="source")
    p.add(Local("work", strategy="interpreters"))
    p.consumer(lambda x: None, name="sink")
    with pytest.raises(mg.DefinitionError, match="defined inside a function"):
        p.run()
    with pytest.raises(mg.DefinitionError, match="__getstate__"):
        jobs.Unpicklable().run()


# -- limits, the main module, leftovers ------------------------------------------------------


@needs_interpreters
def test_max_interpreters_bounds_spawn_interpreter_workers_alive_at_once(tmp_path):
    p = mg.Pipeline("p", config={"max_interpreters": 2})
    folder = str(tmp_path)
    p.producer(lambda: ((folder, x) for x in range(12)), name="source")
    p.processor(_alive, name="work", strategy="spawn_interpreter")
    peaks = []
    p.consumer(peaks.append, name="sink")
    p.run()
    assert len(peaks) == 12
    assert max(peaks) <= 2
    assert max(peaks) == 2, "they ran side by side"


def _alive(pair):
    return jobs.alive_marker(*pair)


@needs_interpreters
def test_interpreters_caps_its_workers_at_max_interpreters(caplog):
    p = mg.Pipeline("p", config={"max_interpreters": 2})
    p.producer(lambda: range(40), name="source")
    p.processor(jobs.in_interpreter, name="work", strategy="interpreters", interpreters=5)
    used = []
    p.consumer(used.append, name="sink")
    p.run()
    assert 1 <= len(set(used)) <= 2
    assert "max_interpreters=2" in caplog.text


def _subinterpreters() -> set[int]:
    """The ids of this process's subinterpreters, the main interpreter left out."""
    interpreters = __import__(BACKPORT, fromlist=["list_all"])
    main = interpreters.get_main().id
    return {i.id for i in interpreters.list_all() if i.id != main}


def _running(ids: set[int]) -> set[int]:
    interpreters = __import__(BACKPORT, fromlist=["list_all"])
    return {i.id for i in interpreters.list_all() if i.id in ids and i.is_running()}


@needs_interpreters
def test_spawn_interpreter_leaves_no_subinterpreter_after_a_run():
    before, kept = LeftBehind(), _subinterpreters()
    p, got = _pipeline(jobs.in_interpreter, "spawn_interpreter", interpreters=2)
    assert p.run().status == "ok" and len(got) == 10
    before.assert_nothing_new(settle=1.0)
    assert _subinterpreters() == kept
    assert not set(got) & kept, "spawn_interpreter takes a new subinterpreter for every item"


@needs_interpreters
def test_interpreters_leaves_its_subinterpreters_idle_and_the_next_run_reuses_them():
    """Nothing runs after a run, and the closed workers' subinterpreters are kept idle for
    the next run: CPython 3.13 does not give a destroyed one's memory back."""
    before = LeftBehind()
    p, first = _pipeline(jobs.in_interpreter, "interpreters", interpreters=2)
    assert p.run().status == "ok" and len(first) == 10
    before.assert_nothing_new(settle=1.0)
    idle = _subinterpreters()
    assert set(first) <= idle and not _running(idle)
    p, second = _pipeline(jobs.in_interpreter, "interpreters", interpreters=2)
    assert p.run().status == "ok" and len(second) == 10
    assert set(second) <= idle, "the second run's workers took the idle subinterpreters"
    assert _subinterpreters() == idle


_AT_EXIT = """
import atexit
import sys

import minigun as mg
from backports import interpreters

sys.path.insert(0, sys.argv[1])
from interpreter_jobs import in_interpreter

def left():
    main = interpreters.get_main().id
    print("left at exit:", [i.id for i in interpreters.list_all() if i.id != main], flush=True)

atexit.register(left)  # registered before minigun's, so it runs after it

if __name__ == "__main__":
    got = []
    p = mg.Pipeline("p")
    p.producer(lambda: range(4), name="source")
    p.processor(in_interpreter, name="work", strategy="interpreters", interpreters=2)
    p.consumer(got.append, name="sink")
    p.run()
    print("worked in", len(set(got)), "subinterpreter(s)", flush=True)
"""


@needs_interpreters
def test_the_idle_subinterpreters_are_destroyed_at_exit(tmp_path):
    script = tmp_path / "at_exit.py"
    script.write_text(_AT_EXIT)
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, str(script), tests],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    assert "worked in" in done.stdout
    assert "left at exit: []" in done.stdout, done.stdout + done.stderr
    assert done.stderr == ""


def _failing_creations(monkeypatch, failures: int) -> list[int]:
    """Make the next ``failures`` subinterpreter creations fail as CPython 3.13's do now
    and then; returns the count of failures still to come."""
    interpreters = __import__(BACKPORT, fromlist=["create"])
    real, left = interpreters.create, [failures]

    def create(*args, **kwargs):
        if left[0]:
            left[0] -= 1
            raise interpreters.InterpreterError("interpreter creation failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(interpreters, "create", create)
    return left


@needs_interpreters
def test_a_subinterpreter_creation_that_fails_twice_is_tried_again(monkeypatch):
    left = _failing_creations(monkeypatch, 2)
    p, got = _pipeline(jobs.in_interpreter, "spawn_interpreter", interpreters=1)
    assert p.run().status == "ok" and len(got) == 10
    assert left == [0]


@needs_interpreters
def test_a_subinterpreter_creation_that_fails_three_times_fails_the_chunk(monkeypatch):
    _failing_creations(monkeypatch, 3)
    p, got = _pipeline(jobs.in_interpreter, "spawn_interpreter", interpreters=1)
    with pytest.raises(mg.PipelineError, match="interpreter creation failed"):
        p.run()


@needs_interpreters
def test_a_fork_after_a_run_destroys_the_idle_subinterpreters_first():
    """CPython crashes a child forked while the process has subinterpreters (CPython issue
    101437): the idle ones a run left go before any fork, and the child's own run starts
    new ones."""
    p, got = _pipeline(jobs.in_interpreter, "interpreters", interpreters=1)
    assert p.run().status == "ok" and len(got) == 10
    assert _subinterpreters()
    pid = os.fork()
    if pid == 0:  # the child: one run, then out without running the parent's cleanup
        code = 1
        try:
            p, got = _pipeline(jobs.in_interpreter, "interpreters", interpreters=1)
            code = 0 if p.run().status == "ok" and len(got) == 10 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert not _subinterpreters()


@needs_interpreters
@pytest.mark.parametrize("fork_strategy", ["spawn_fork", "fork_ipc"])
@pytest.mark.parametrize("sub_strategy", ["interpreters", "spawn_interpreter"])
def test_a_run_with_fork_and_subinterpreter_stages_is_refused_up_front(fork_strategy, sub_strategy):
    p = mg.Pipeline("p")
    p.producer(lambda: range(3), name="source")
    p.processor(jobs.slow, name="sub", strategy=sub_strategy)
    p.processor(jobs.slow, name="forked", strategy=fork_strategy)
    p.consumer(lambda x: None, name="sink")
    with pytest.raises(mg.DefinitionError) as refused:
        p.run()
    message = str(refused.value)
    assert "'forked'" in message and "'sub'" in message and "101437" in message


@needs_interpreters
def test_a_task_with_fork_and_subinterpreter_stages_is_refused_up_front():
    with pytest.raises(mg.DefinitionError) as refused:
        jobs.ForkBesideSubinterpreters().run()
    message = str(refused.value)
    assert "'forked'" in message and "'sub'" in message and "101437" in message


@needs_interpreters
def test_a_fork_while_another_runs_subinterpreters_fails_its_items_with_the_reason():
    """Two runs at once, one with subinterpreter workers: the other's forks are refused,
    each item failing with why, instead of children that crash."""
    started = threading.Event()
    p = mg.Pipeline("p")
    p.producer(lambda: range(1000), name="source")
    p.processor(jobs.slow, name="work", strategy="interpreters", interpreters=1)
    p.consumer(lambda x: started.set(), name="sink")  # noqa: ARG005
    busy = p.start()
    try:
        assert started.wait(30)
        errors = []
        q = mg.Pipeline("q")
        q.producer(lambda: range(2), name="source")
        q.processor(jobs.slow, name="forked", strategy="spawn_fork")
        q.consumer(lambda x: None, name="sink")
        q.on_error(lambda error, item, stage: errors.append((item, str(error))))
        assert q.run().status == "ok"
        assert sorted(item for item, _ in errors) == [0, 1]
        assert all("subinterpreter" in why and "101437" in why for _, why in errors), errors
    finally:
        busy.cancel()
        busy.wait()


_SCRIPT = """
import sys

import minigun as mg

# One write per line: the workers run in parallel, and print() writes a line in pieces.
sys.stdout.write(f"the script ran as {__name__}\\n")

def square(x):
    return x * x

if __name__ == "__main__":
    got = []
    p = mg.Pipeline("p")
    p.producer(lambda: range(5), name="source")
    p.processor(square, name="work", strategy="interpreters", interpreters=2)
    p.consumer(got.append, name="sink")
    p.run()
    print("result", sorted(got))
"""


@needs_interpreters
def test_a_stage_defined_in_the_script_being_run(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    lines = collections.Counter(done.stdout.splitlines())
    assert lines["result [0, 1, 4, 9, 16]"] == 1
    assert lines["the script ran as __main__"] == 1
    # Each worker imported the script under another name, its main block skipped.
    assert 1 <= lines["the script ran as __mp_main__"] <= 2


_CTRL_C_JOB = """
import itertools, sys, time
import minigun as mg

def slow(x):
    time.sleep(0.01)
    return x

if __name__ == "__main__":
    p = mg.Pipeline("p")
    p.producer(lambda: itertools.count(), name="source")
    p.processor(slow, name="work", strategy=sys.argv[1], interpreters=2)
    p.consumer(lambda x: print("item", flush=True), name="sink")
    try:
        p.run()
    except KeyboardInterrupt:
        from backports import interpreters
        alive = [i.id for i in interpreters.list_all() if i.id != interpreters.get_main().id]
        print("INTERRUPTED, subinterpreters left:", alive, flush=True)
        sys.exit(0)
    print("NOT INTERRUPTED", flush=True)
    sys.exit(1)
"""


@needs_interpreters
@pytest.mark.parametrize("strategy", ["interpreters", "spawn_interpreter"])
def test_ctrl_c_ends_the_run_promptly_and_leaves_no_subinterpreter(tmp_path, strategy):
    script = tmp_path / "endless.py"
    script.write_text(textwrap.dedent(_CTRL_C_JOB))
    proc = subprocess.Popen(
        [sys.executable, str(script), strategy],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for _ in range(3):  # items are flowing
            assert proc.stdout.readline() == "item\n"
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "INTERRUPTED, subinterpreters left: []" in out, out + err
    assert took < 3, f"Ctrl-C took {took:.1f} s"


# -- where subinterpreters are not available -------------------------------------------------


def _double(x):
    return 2 * x


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="needs a Python before 3.13")
@pytest.mark.parametrize("strategy", ["interpreters", "ractor", "spawn_interpreter"])
def test_before_3_13_the_strategy_is_refused_naming_the_version(strategy):
    with pytest.raises(mg.UnsupportedStrategy, match=r"CPython 3\.13 or newer"):
        mg.processor(strategy=strategy)(_double)


@pytest.mark.skipif(sys.version_info < (3, 13), reason="needs CPython 3.13+")
@pytest.mark.parametrize("strategy", ["interpreters", "spawn_ractor"])
def test_without_the_backport_the_strategy_is_refused_naming_the_extra(monkeypatch, strategy):
    monkeypatch.setitem(sys.modules, BACKPORT, None)  # what an uninstalled module looks like
    with pytest.raises(mg.UnsupportedStrategy) as info:
        mg.processor(strategy=strategy)(_double)
    assert 'pip install "minigun-pipelines[interpreters]"' in str(info.value)
