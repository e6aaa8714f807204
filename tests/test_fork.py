"""The process strategies (spawn_fork, fork_ipc), fork hooks and fork logging, through the
public API only."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import warnings

import pytest
from _mg_helpers import PYTHON, subprocess_env, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

import minigun as mg

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def gone(pid: int) -> bool:
    """The process no longer exists, not even as a zombie of ours."""
    try:
        os.waitpid(pid, os.WNOHANG)
        return False  # still our (unreaped) child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Unpicklable:
    """Proof of copy-on-write: any attempt to pickle this raises."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        raise AssertionError("an Unpicklable object was pickled")


# -- exactly once -----------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(0, 60),
    batch=st.integers(1, 12),
    max_processes=st.integers(1, 3),
    processes=st.integers(1, 3),
    emit_style=st.sampled_from(["return", "emit", "yield"]),
)
def test_every_item_exactly_once_through_spawn_fork_and_fork_ipc(
    n, batch, max_processes, processes, emit_style
):
    seen = []
    p = mg.Pipeline("exact", config={"max_processes": max_processes})

    @p.producer
    def numbers():
        yield from range(n)

    p.accumulator(name="batch", max_size=batch)

    if emit_style == "return":

        @p.processor(strategy="spawn_fork")
        def expand(items):
            return [x * 10 for x in items]

        @p.processor(strategy="fork_ipc", processes=processes)
        def spread(items):
            for x in items:
                mg.emit(x + 1)
    elif emit_style == "emit":

        @p.processor(strategy="spawn_fork")
        def expand(items):
            for x in items:
                mg.emit(x * 10)

        @p.processor(strategy="fork_ipc", processes=processes)
        def spread(x):
            return x + 1
    else:

        @p.processor(strategy="spawn_fork")
        def expand(items):
            for x in items:
                yield x * 10

        @p.processor(strategy="fork_ipc", processes=processes)
        def spread(x):
            yield x + 1

    p.consumer(seen.append, name="collect")
    result = p.run()
    assert sorted(seen) == [x * 10 + 1 for x in range(n)]
    assert result.stats["collect"].items_in == n


# -- copy-on-write ----------------------------------------------------------------------------


def test_spawn_fork_children_read_items_and_self_without_pickling():
    class Job(mg.Task):
        def __init__(self):
            self.table = Unpicklable(bytes(range(256)) * 40_000)  # ~10 MB, never pickled
            self.sums = []

        @mg.producer
        def rows(self):
            for i in range(50):
                yield Unpicklable(i)

        batch = mg.accumulator("batch", max_size=10)

        @mg.processor(strategy="spawn_fork")
        def total(self, rows):
            assert isinstance(rows, list) and len(rows) == 10
            return sum(r.value for r in rows) + self.table.value[255]

        @mg.consumer
        def keep(self, s):
            self.sums.append(s)

    job = Job()
    job.run()
    assert sorted(job.sums) == sorted(sum(range(k, k + 10)) + 255 for k in range(0, 50, 10))


def test_fork_ipc_workers_get_the_task_instance_as_it_was_at_fork_time():
    class Job(mg.Task):
        def __init__(self):
            self.secret = Unpicklable("from the parent")
            self.out = []

        @mg.producer
        def gen(self):
            yield from range(6)

        @mg.processor(strategy="fork_ipc", processes=2)
        def read(self, x):
            self.secret.value += "!"  # changes the child's copy only
            return (x, os.getpid(), self.secret.value.count("!"))

        @mg.consumer
        def keep(self, v):
            self.out.append(v)

    job = Job()
    job.run()
    assert job.secret.value == "from the parent"
    assert sorted(x for x, _, _ in job.out) == list(range(6))
    pids = {pid for _, pid, _ in job.out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    for pid in pids:  # a long-lived worker: its copy accumulates across its items
        marks = sorted(m for _, p, m in job.out if p == pid)
        assert marks == list(range(1, len(marks) + 1))


# -- the max_processes budget -------------------------------------------------------------------


def _alive_marker(folder, hold=0.04, wait_for_company=0.5):
    """Called inside a child: register this process, hold, and report the most registered
    processes seen at once. It holds on (up to ``wait_for_company`` seconds) while it is
    alone, so a loaded machine, where forks are slow to start, does not hide overlap."""
    mine = os.path.join(folder, str(os.getpid()))
    open(mine, "w").close()
    time.sleep(hold)
    alive = len(os.listdir(folder))
    deadline = time.monotonic() + wait_for_company
    while alive < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
        alive = max(alive, len(os.listdir(folder)))
    os.remove(mine)
    return alive


def test_max_processes_bounds_spawn_fork_children_seen_from_inside(tmp_path):
    folder = str(tmp_path)

    class Job(mg.Task):
        max_processes = 3

        def __init__(self):
            self.peaks = []

        @mg.producer
        def gen(self):
            yield from range(40)

        batch = mg.accumulator("batch", max_size=2)

        @mg.processor(strategy="spawn_fork")
        def work(self, items):
            return _alive_marker(folder)

        @mg.consumer
        def keep(self, n):
            self.peaks.append(n)

    job = Job()
    job.run()
    assert len(job.peaks) == 20
    assert max(job.peaks) <= 3
    assert max(job.peaks) >= 2  # they did run side by side


class Registered(mg.Stage):
    """A fork_ipc stage whose worker process is registered in a folder for its whole life."""

    folder = ""

    def open(self):
        self.mine = os.path.join(self.folder, str(os.getpid()))
        open(self.mine, "w").close()

    def process(self, item):
        time.sleep(0.01)
        return len(os.listdir(self.folder))

    def close(self):
        os.remove(self.mine)


def test_the_budget_is_shared_by_every_fork_stage_of_the_pipeline(tmp_path):
    folder = str(tmp_path)
    Registered.folder = folder

    class Job(mg.Task):
        max_processes = 3

        def __init__(self):
            self.peaks = []

        @mg.producer
        def gen(self):
            yield from range(24)

        batch = mg.accumulator("batch", max_size=2)

        @mg.processor(strategy="spawn_fork")
        def first(self, items):
            return _alive_marker(folder, 0.03)

        @mg.processor(strategy="spawn_fork", processes=3)
        def second(self, n):
            return max(n, _alive_marker(folder, 0.03))

        ipc = Registered("ipc", strategy="fork_ipc", processes=1)

        @mg.consumer
        def keep(self, n):
            self.peaks.append(n)

    job = Job()
    job.run()
    assert len(job.peaks) == 12
    # fork_ipc reserves one process; both spawn_fork stages share the other two.
    assert max(job.peaks) <= 3
    assert os.listdir(folder) == []


def test_fork_ipc_stages_share_the_budget_and_each_keeps_one_process(mg_caplog):
    class Job(mg.Task):
        max_processes = 2

        def __init__(self):
            self.out = []

        @mg.producer
        def gen(self):
            yield from range(10)

        @mg.processor(strategy="fork_ipc", processes=2)
        def a(self, x):
            return (x, os.getpid())

        @mg.processor(strategy="fork_ipc", processes=2)
        def b(self, v):
            return v + (os.getpid(),)

        @mg.consumer
        def keep(self, v):
            self.out.append(v)

    job = Job()
    job.run()
    assert sorted(x for x, _, _ in job.out) == list(range(10))
    assert len({a for _, a, _ in job.out}) == 1 and len({b for _, _, b in job.out}) == 1
    capped = [r.getMessage() for r in mg_caplog.records if "fork_ipc processes" in r.getMessage()]
    assert len(capped) == 2 and "max_processes=2" in capped[0]


# -- hooks -------------------------------------------------------------------------------------


class Inner(mg.Task):
    @mg.after_fork
    def inner_wide(self):
        Outer.marks.append("inner-wide")

    @mg.after_fork("deep")
    def inner_scoped(self):
        Outer.marks.append("inner-deep")

    @mg.processor(strategy="spawn_fork")
    def deep(self, items):
        return [*items, ("deep", os.getpid(), list(Outer.marks))]


class Outer(mg.Task):
    marks: list = []  # appended to in children only (each child has its own copy)

    def __init__(self):
        self.before = []
        self.results = []

    @mg.before_fork
    def before_wide(self):
        self.before.append(("wide", os.getpid()))

    @mg.before_fork("top")
    def before_top(self):
        self.before.append(("top", os.getpid()))

    @mg.after_fork
    def after_wide(self):
        Outer.marks.append("outer-wide")

    @mg.after_fork("top")
    def after_top(self):
        Outer.marks.append("top")

    @mg.after_fork("sub")
    def after_sub(self):
        Outer.marks.append("outer-sub")

    @mg.after_fork("nothing_forks_here")
    def never(self):
        Outer.marks.append("never")

    @mg.producer
    def gen(self):
        yield from range(6)

    batch = mg.accumulator("batch", max_size=2)

    @mg.processor(strategy="spawn_fork")
    def top(self, items):
        return ("top", os.getpid(), list(Outer.marks))

    @mg.processor
    def nothing_forks_here(self, result):
        return [result]  # a batch for the nested pipeline

    sub = mg.nested(Inner, name="sub")

    @mg.consumer
    def keep(self, results):
        self.results.extend(results)


def test_fork_hooks_run_in_the_right_process_in_the_right_order():
    job = Outer()
    job.run()
    me = os.getpid()
    assert Outer.marks == []  # after_fork never ran in the parent
    top = [r for r in job.results if r[0] == "top"]
    deep = [r for r in job.results if r[0] == "deep"]
    assert len(top) == 3 and len(deep) == 3
    for _, pid, marks in top:
        assert pid != me
        assert marks == ["outer-wide", "top"]
    for _, pid, marks in deep:
        assert pid != me
        # pipeline-wide hooks outermost first, then the scoped ones outermost first
        assert marks == ["outer-wide", "inner-wide", "outer-sub", "inner-deep"]
    assert len({pid for _, pid, _ in job.results}) == 6  # one child per batch
    assert all(pid == me for _, pid in job.before)
    assert [k for k, _ in job.before].count("wide") == 6  # every fork of every stage
    assert [k for k, _ in job.before].count("top") == 3


def test_fork_ipc_runs_fork_hooks_once_per_worker_process():
    class Job(mg.Task):
        def __init__(self):
            # The two workers' threads fork, and run this hook, at the same time: counted
            # by appending, since `+= 1` from two threads loses counts on a free-threaded
            # build (a CI run counted 1 fork of 2).
            self.before = []
            self.after = 0  # counted in each child's copy
            self.out = []

        @mg.before_fork
        def count_before(self):
            self.before.append(threading.get_ident())

        @mg.after_fork("work")
        def count_after(self):
            self.after += 1

        @mg.producer
        def gen(self):
            yield from range(20)

        @mg.processor(strategy="fork_ipc", processes=2)
        def work(self, x):
            return (os.getpid(), self.after)

        @mg.consumer
        def keep(self, v):
            self.out.append(v)

    job = Job()
    job.run()
    pids = {pid for pid, _ in job.out}
    assert len(job.before) == len(pids) and job.after == 0
    assert all(after == 1 for _, after in job.out)


# -- errors --------------------------------------------------------------------------------------


class Odd(Exception):
    def __init__(self, message, code):
        super().__init__(message, code)
        self.code = code


def test_a_child_exception_reaches_the_parent_as_itself_with_its_traceback():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        batch = mg.accumulator("batch", max_size=2)

        @mg.processor(strategy="spawn_fork")
        def explode(self, items):
            if 2 in items:
                raise Odd("two is odd here", 42)
            return items

        @mg.consumer
        def sink(self, items):
            pass

    with pytest.raises(mg.PipelineError) as info:
        Job().run()
    exc = info.value.__cause__
    assert type(exc) is Odd and exc.code == 42
    assert "raise Odd(" in exc.traceback_text and "in explode" in exc.traceback_text
    assert any("forked child process" in note and "explode" in note for note in exc.__notes__)
    assert info.value.stage == "explode"


def test_an_unpicklable_child_exception_becomes_a_worker_error_and_on_error_sees_it():
    handled = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(6)

        @mg.processor(strategy="fork_ipc")
        def explode(self, x):
            if x == 3:
                err = ValueError("cannot travel")
                err.payload = lambda: None  # not picklable
                raise err
            return x

        @mg.consumer
        def sink(self, x):
            pass

        @mg.on_error(mg.WorkerError)
        def handle(self, error, item, stage):
            handled.append((type(error), item, stage, str(error), error.traceback_text))

    result = Job().run()
    assert result.status == "ok"
    assert result.stats["sink"].items_in == 5
    [(kind, item, stage, message, text)] = handled
    assert kind is mg.WorkerError and item == 3 and stage == "explode"
    assert "ValueError" in message and "cannot travel" in message and "explode" in message
    assert "raise err" in text


def test_fork_ipc_workers_survive_an_item_error():
    out, errors = [], []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(8)

        @mg.processor(strategy="fork_ipc", processes=1)
        def work(self, x):
            if x % 3 == 0:
                raise KeyError(x)
            return os.getpid()

        @mg.consumer
        def sink(self, pid):
            out.append(pid)

        @mg.on_error(KeyError)
        def handle(self, error, item, stage):
            errors.append(item)

    Job().run()
    assert sorted(errors) == [0, 3, 6]
    assert len(out) == 5 and len(set(out)) == 1


def test_a_sigkilled_child_is_an_error_of_its_item_not_a_hang():
    errors = []

    class Job(mg.Task):
        def __init__(self):
            self.out = []

        @mg.producer
        def gen(self):
            yield from range(6)

        batch = mg.accumulator("batch", max_size=2)

        @mg.processor(strategy="spawn_fork")
        def work(self, items):
            if 2 in items:
                os.kill(os.getpid(), signal.SIGKILL)
            return items

        @mg.processor(strategy="fork_ipc")
        def ipc(self, items):
            if 4 in items:
                os.kill(os.getpid(), signal.SIGKILL)
            return items

        @mg.consumer
        def sink(self, items):
            self.out.extend(items)

        @mg.on_error(mg.WorkerError)
        def handle(self, error, item, stage):
            errors.append((stage, list(item), str(error)))

    job = Job()
    started = time.monotonic()
    job.run()
    assert time.monotonic() - started < 5
    assert sorted(job.out) == [0, 1]
    assert sorted(e[:2] for e in errors) == [("ipc", [4, 5]), ("work", [2, 3])]
    for _, _, message in errors:
        assert "SIGKILL" in message and "child process" in message


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_a_fork_ipc_worker_killed_while_idle_is_replaced():
    killed = threading.Event()
    out = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 0
            assert killed.wait(5)
            yield 1

        @mg.processor(strategy="fork_ipc")
        def work(self, x):
            return (x, os.getpid())

        @mg.consumer
        def keep(self, v):
            out.append(v)
            if v[0] == 0:
                os.kill(v[1], signal.SIGKILL)
                assert wait_until(lambda: _is_zombie(v[1]), timeout=5)
                killed.set()

    result = Job().run()
    assert result.status == "ok" and result.stats["work"].errors == 0
    assert [x for x, _ in out] == [0, 1] and out[0][1] != out[1][1]


def test_a_dead_child_fails_the_run_without_a_handler():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield 1

        @mg.processor(strategy="spawn_fork")
        def work(self, x):
            os._exit(3)

    with pytest.raises(mg.PipelineError) as info:
        Job().run()
    err = info.value.__cause__
    assert isinstance(err, mg.WorkerError)
    assert "'work'" in str(err) and "exit code 3" in str(err)


def test_retried_items_appear_once(tmp_path):
    flag = tmp_path / "failed-once"
    out = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor(strategy="spawn_fork", retries=1, retry_on=RuntimeError)
        def flaky(self, x):
            mg.emit(("early", x))
            if x == 1 and not flag.exists():
                flag.touch()
                raise RuntimeError("first attempt")
            return ("late", x)

        @mg.consumer
        def sink(self, v):
            out.append(v)

    result = Job().run()
    assert sorted(out) == sorted([(k, x) for k in ("early", "late") for x in range(3)])
    assert result.stats["flaky"].retries == 1


def test_a_child_cannot_use_the_parents_run():
    class Job(mg.Task):
        def __init__(self):
            self.out = []

        @mg.producer
        def gen(self):
            yield 1

        @mg.producer(auto_start=False)
        def later(self):
            yield 2

        @mg.processor(strategy="spawn_fork", from_=["gen", "later"])
        def work(self, x):
            try:
                self.trigger("later")
            except mg.MinigunError as exc:
                return str(exc)
            return "triggered"

        @mg.consumer
        def keep(self, v):
            self.out.append(v)

        @mg.before_run
        def start_later(self):
            self.trigger("later")

    job = Job()
    job.run()
    assert len(job.out) == 2
    assert all("parent process" in v for v in job.out)


@pytest.mark.skipif(
    bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
    reason="free-threaded 3.13: gc.freeze() deadlocks in a forked child, so a child goes without",
)
@pytest.mark.parametrize("strategy", ["spawn_fork", "fork_ipc"])
def test_a_child_never_frees_what_it_inherited(tmp_path, strategy):
    """Garbage the parent had not collected yet at the fork (here a cycle whose __del__
    records the pid it ran in) is never collected in the child: freeing an inherited
    extension object there could wait forever on a lock another parent thread held."""
    finalized = tmp_path / "finalized"

    class Cycle:
        def __init__(self):
            self.me = self

        def __del__(self):
            with open(finalized, "a") as f:
                f.write(f"{os.getpid()}\n")

    def collect_in_child(x):
        gc.collect()
        return os.getpid()

    gc.disable()
    try:
        Cycle()  # unreachable at once, left for the collector
        p = mg.Pipeline("inherits_garbage")
        p.producer(lambda: range(4), name="gen")
        p.processor(collect_in_child, name="collect", strategy=strategy)
        children = []
        p.consumer(children.append, name="sink")
        p.run()
    finally:
        gc.enable()
    assert children and os.getpid() not in children
    gc.collect()  # (something in the parent may have collected it already: that is fine)
    finalized_in = finalized.read_text().split()
    assert finalized_in == [str(os.getpid())], f"finalized in {finalized_in}; children {children}"


# -- shutdown ----------------------------------------------------------------------------------


CTRL_C_JOB = """
import os, sys, time
import minigun as mg

folder = sys.argv[1]

def mark(kind):
    open(os.path.join(folder, f"{kind}-{os.getpid()}"), "w").close()

class Job(mg.Task):
    max_processes = 3

    @mg.after_fork
    def register(self):
        mark("child")

    @mg.producer
    def gen(self):
        yield from range(4)

    @mg.processor(strategy="fork_ipc")
    def quick(self, x):
        return x

    @mg.processor(strategy="spawn_fork")
    def slow(self, x):
        time.sleep(60)

try:
    Job().run()
except KeyboardInterrupt:
    pids = [int(n.split("-")[1]) for n in os.listdir(folder) if n.startswith("child-")]
    left = []
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
            left.append(pid)  # still an unreaped child
            continue
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
            left.append(pid)
        except ProcessLookupError:
            pass
    print("INTERRUPTED", len(pids), "LEFT", left, flush=True)
    sys.exit(0)
print("NOT INTERRUPTED", flush=True)
sys.exit(1)
"""


def test_ctrl_c_mid_run_leaves_no_child_alive(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(CTRL_C_JOB))
    folder = tmp_path / "pids"
    folder.mkdir()
    proc = subprocess.Popen(
        [PYTHON, str(script), str(folder)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # one idle fork_ipc worker + two sleeping spawn_fork children
        assert wait_until(lambda: len(os.listdir(folder)) >= 3, timeout=10)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert "INTERRUPTED 3 LEFT []" in out, out + err
    for name in os.listdir(folder):
        assert gone(int(name.split("-")[1]))


def test_cancel_terminates_busy_and_idle_children(tmp_path):
    pids = tmp_path

    class Job(mg.Task):
        max_processes = 3

        @mg.after_fork
        def register(self):
            (pids / str(os.getpid())).touch()

        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor(strategy="fork_ipc")
        def quick(self, x):
            return x

        @mg.processor(strategy="spawn_fork")
        def slow(self, x):
            time.sleep(60)

    run = Job().start()
    assert wait_until(lambda: len(os.listdir(pids)) >= 3, timeout=10)
    started = time.monotonic()
    run.cancel()
    result = run.wait(timeout=10)
    assert result.status == "cancelled"
    assert time.monotonic() - started < 3
    children = [int(n) for n in os.listdir(pids)]
    assert children and all(gone(pid) for pid in children)


#: How long cancel() may take to end a run whose fork stages wait for a child or for room in
#: the process budget: waits wake on the run's stop signal (a few ms), not at a poll slice.
PROMPTLY = 0.5


@pytest.mark.parametrize("strategy", ["spawn_fork", "fork_ipc"])
def test_cancel_ends_a_run_with_a_child_mid_item_promptly(tmp_path, strategy):
    started_items = tmp_path

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(100)

        @mg.processor(strategy=strategy)
        def slow(self, x):
            (started_items / f"{os.getpid()}-{x}").touch()
            time.sleep(60)

    run = Job().start()
    assert wait_until(lambda: os.listdir(started_items), timeout=10)
    began = time.monotonic()
    run.cancel()
    result = run.wait(timeout=10)
    took = time.monotonic() - began
    assert result.status == "cancelled"
    assert took < PROMPTLY, f"cancel() took {took:.3f} s"
    pids = {int(name.split("-")[0]) for name in os.listdir(started_items)}
    assert pids and all(gone(pid) for pid in pids)


def test_cancel_ends_a_run_whose_spawn_fork_stage_waits_for_budget_promptly(tmp_path):
    """Two spawn_fork stages, max_processes=3: each keeps one process, and the one left over
    goes to whichever stage asks first; the other stage's second worker waits for room."""
    started_items = tmp_path

    class Job(mg.Task):
        max_processes = 3

        @mg.producer
        def gen(self):
            yield from range(100)

        @mg.processor(strategy="spawn_fork", to=["second"])
        def first(self, x):
            (started_items / f"{os.getpid()}-first-{x}").touch()
            time.sleep(60)

        @mg.producer
        def more(self):
            yield from range(100)

        @mg.processor(strategy="spawn_fork", from_=["more"])
        def second(self, x):
            (started_items / f"{os.getpid()}-second-{x}").touch()
            time.sleep(60)

    run = Job().start()
    # Three children run (the whole budget): some worker of one stage waits for room.
    assert wait_until(lambda: len(os.listdir(started_items)) >= 3, timeout=10)
    time.sleep(0.05)
    assert len(os.listdir(started_items)) == 3, "max_processes=3 allows three children"
    began = time.monotonic()
    run.cancel()
    result = run.wait(timeout=10)
    took = time.monotonic() - began
    assert result.status == "cancelled"
    assert took < PROMPTLY, f"cancel() took {took:.3f} s"
    pids = {int(name.split("-")[0]) for name in os.listdir(started_items)}
    assert all(gone(pid) for pid in pids)


# -- volume, use_ipc, warnings, logging ---------------------------------------------------------


def test_a_100_mb_result_streams_back_without_deadlock():
    size = 100 * 1024 * 1024
    got = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield size

        @mg.processor(strategy="spawn_fork")
        def big(self, n):
            return b"\x07" * n

        @mg.consumer
        def keep(self, blob):
            got.append((len(blob), blob[:1], blob[-1:]))

    started = time.monotonic()
    Job().run()
    assert got == [(size, b"\x07", b"\x07")]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("use_ipc", [False, True])
def test_a_terminal_spawn_fork_stage_sends_values_back_only_with_use_ipc(use_ipc):
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(4)

        @mg.processor(strategy="spawn_fork")
        def last(self, x):
            mg.emit(x)
            return x

    Job.use_ipc = use_ipc
    result = Job().run()
    assert result.stats["last"].items_in == 4
    assert result.stats["last"].items_out == (8 if use_ipc else 0)


def run_job(tmp_path, source: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``source`` as a script in a fresh interpreter, its output captured as bytes."""
    script = tmp_path / "job.py"
    script.write_text(source)
    return subprocess.run(
        [PYTHON, str(script), *args], env=subprocess_env(), capture_output=True, timeout=60
    )


BLOCKED_STDOUT_JOB = """
import io, os, sys, threading, time
import minigun as mg

# sys.__stdout__ over a pipe nobody reads, and a thread stuck inside a write to it: its
# buffer lock stays held, in the parent and in every child forked meanwhile.
r, w = os.pipe()
blocked = io.TextIOWrapper(io.BufferedWriter(io.FileIO(w, "w")), write_through=True)
real_stdout, sys.__stdout__ = sys.__stdout__, blocked
sys.stdout = io.StringIO()  # replaced, as pytest's capture replaces it
threading.Thread(target=lambda: blocked.write("x" * (1 << 22)), daemon=True).start()
time.sleep(0.3)

p = mg.Pipeline("prints", config={"max_processes": 2})
p.producer(lambda: range(4), name="gen")

@p.processor(strategy=sys.argv[1])
def shout(x):
    print(f"child says {x}", file=sys.__stdout__, flush=True)
    return x

out = []
p.consumer(out.append, name="sink")
p.run()
real_stdout.write(f"delivered {sorted(out)}\\n")
real_stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize("strategy", ["spawn_fork", "fork_ipc"])
def test_a_child_writing_to_the_original_stdout_never_waits_for_a_lock_held_at_the_fork(
    tmp_path, strategy
):
    """sys.stdout replaced (as under pytest) and another thread inside a write to
    sys.__stdout__ at the fork: the child's print to sys.__stdout__ goes out over fd 1."""
    done = run_job(tmp_path, BLOCKED_STDOUT_JOB, strategy)
    assert done.returncode == 0, done.stderr
    stdout = done.stdout.decode()
    assert "delivered [0, 1, 2, 3]" in stdout
    assert sorted(line for line in stdout.splitlines() if line.startswith("child")) == [
        f"child says {x}" for x in range(4)
    ]


STREAM_SETTINGS_JOB = """
import sys
import minigun as mg

def run(tag):
    p = mg.Pipeline("prints", config={"max_processes": 1})
    p.producer(lambda: range(2), name="gen")

    @p.processor(strategy=sys.argv[1], processes=1)
    def shout(x):
        sys.stdout.write(f"{tag}{x}:\\u00e9;")  # no newline, no flush: the child flushes
        return x

    p.consumer(lambda x: None, name="sink")
    p.run()

sys.stdout.reconfigure(encoding="ascii", errors="backslashreplace")
run("a")
sys.stdout.reconfigure(errors="replace")
run("b")
"""


@pytest.mark.parametrize("strategy", ["spawn_fork", "fork_ipc"])
def test_a_child_writes_with_the_std_stream_settings_of_its_run_and_each_write_once(
    tmp_path, strategy
):
    """A child's sys.stdout is made in the parent and kept for later children: it
    follows the parent's stdout settings as they change between runs, and what one child
    wrote is never written again by the next."""
    done = run_job(tmp_path, STREAM_SETTINGS_JOB, strategy)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"a0:\\xe9;a1:\\xe9;b0:?;b1:?;"


class ThreadsThenFork(mg.Task):
    """Forks while other threads run: what 3.12+ warns about."""

    @mg.producer
    def gen(self):
        yield from range(4)

    @mg.processor(threads=2)
    def busy(self, x):
        return x

    @mg.processor(strategy="spawn_fork")
    def forked(self, x):
        return x


def test_no_multithreaded_fork_warning_leaks():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ThreadsThenFork().run()
    assert not [w for w in caught if "fork" in str(w.message)]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="the warning is new in 3.12")
def test_the_fork_warning_stays_quiet_when_a_filter_is_put_in_front_of_minigun_s():
    """A run installs minigun's filter; a later ``catch_warnings`` copies the filters and
    puts "always" in front of it (pytest does so around every test). minigun's next fork
    must still be quiet: once a run forked from a thread left its filter in the list
    pytest restores, every fork of the later tests warned."""
    ThreadsThenFork().run()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ThreadsThenFork().run()
    assert not [w for w in caught if "fork" in str(w.message)]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="the warning is new in 3.12")
def test_the_fork_warning_is_only_silenced_for_minigun_forks():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(3)

        @mg.processor(strategy="spawn_fork")
        def forked(self, x):
            return x

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Job().run()  # minigun's filter now sits before "always"
            pid = os.fork()  # the user's own fork, with another thread alive
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
    finally:
        stop.set()
        other.join()
    forks = [w for w in caught if "fork" in str(w.message)]
    assert len(forks) == 1 and forks[0].filename == __file__


def test_forks_and_exits_are_logged_at_debug(caplog):
    logger = logging.getLogger("minigun")
    caplog.set_level(logging.DEBUG, logger="minigun")
    old = logger.propagate
    logger.propagate = True
    try:

        class Job(mg.Task):
            @mg.producer
            def gen(self):
                yield from range(6)

            batch = mg.accumulator("batch", max_size=3)

            @mg.processor(strategy="spawn_fork")
            def crunch(self, items):
                return len(items)

            @mg.processor(strategy="fork_ipc")
            def relay(self, n):
                return n

        Job().run()
    finally:
        logger.propagate = old
    forks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fork:")]
    exits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("exit:")]
    assert sum("'crunch'" in m and "3 item(s)" in m for m in forks) == 2
    assert sum("'relay'" in m for m in forks) == 1
    assert len(exits) == 3
    assert all("exit code 0" in m and "pid" in m and "s (" in m for m in exits)


def test_custom_stage_with_fork_ipc_opens_and_closes_in_its_worker_process():
    totals = []

    class Summer(mg.Stage):
        def open(self):
            self.total = 0
            self.pid = os.getpid()

        def process(self, item):
            self.total += item

        def close(self):
            self.emit(("total", self.pid, self.total))

    p = mg.Pipeline("custom")
    p.producer(lambda: range(100), name="gen")
    p.add(Summer("summer", strategy="fork_ipc", processes=2))
    p.consumer(totals.append, name="keep")
    p.run(max_processes=2)
    assert sum(t for _, _, t in totals) == sum(range(100))
    assert all(pid != os.getpid() for _, pid, _ in totals)
    assert 1 <= len(totals) <= 2


def test_fork_strategies_report_in_run_stats():
    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(10)

        batch = mg.accumulator("batch", max_size=5)

        @mg.processor(strategy="cow_fork")  # an alias of spawn_fork
        def a(self, items):
            return items

        @mg.processor(strategy="ipc_fork")  # an alias of fork_ipc
        def b(self, items):
            yield from items

        @mg.consumer
        def c(self, x):
            pass

    result = Job().run()
    assert result.stats["a"].items_in == 2 and result.stats["a"].items_out == 2
    assert result.stats["b"].items_in == 2 and result.stats["b"].items_out == 10
    assert result.stats["c"].items_in == 10
    assert result.stats["a"].latency_p50 > 0


if sys.platform != "linux":  # pragma: no cover - the Ctrl-C test relies on process groups
    test_ctrl_c_mid_run_leaves_no_child_alive = pytest.mark.skip("Linux only")(
        test_ctrl_c_mid_run_leaves_no_child_alive
    )


# -- fork_ipc moves items in chunks -------------------------------------------------------


def test_fork_ipc_moves_cheap_items_in_chunks():
    out = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(5000)

        @mg.processor(strategy="fork_ipc", processes=2)
        def double(self, x):
            return 2 * x

        @mg.consumer
        def sink(self, x):
            out.append(x)

    stats = Job().run().stats["double"]
    assert sorted(out) == [2 * x for x in range(5000)]
    assert stats.items_in == 5000 and stats.chunks_in < 5000 / 8, stats


def test_fork_ipc_retries_in_the_worker_and_emits_each_item_once():
    out = []

    class Job(mg.Task):
        def __init__(self):
            self.attempts = {}  # the worker process's own copy counts its attempts

        @mg.producer
        def gen(self):
            yield from range(20)

        @mg.processor(strategy="fork_ipc", retries=2, retry_on=RuntimeError, retry_backoff=0.001)
        def flaky(self, x):
            self.emit(("early", x))
            self.attempts[x] = self.attempts.get(x, 0) + 1
            if x % 5 == 0 and self.attempts[x] < 3:
                raise RuntimeError(f"attempt {self.attempts[x]}")
            return ("late", x)

        @mg.consumer
        def sink(self, v):
            out.append(v)

    result = Job().run()
    assert sorted(out) == sorted((k, x) for k in ("early", "late") for x in range(20))
    assert result.stats["flaky"].retries == 4 * 2
    assert result.stats["flaky"].errors == 0


def test_a_fork_ipc_child_killed_mid_chunk_fails_one_item_and_loses_none():
    out, errors = [], []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            yield from range(300)

        @mg.processor(strategy="fork_ipc", processes=1)
        def work(self, x):
            if x == 150:
                os.kill(os.getpid(), signal.SIGKILL)
            return x

        @mg.consumer
        def sink(self, x):
            out.append(x)

        @mg.on_error(mg.WorkerError)
        def handle(self, error, item, stage):
            errors.append(item)

    result = Job().run()
    assert errors == [150]
    assert sorted(out) == [x for x in range(300) if x != 150]
    assert result.stats["work"].errors == 1


def test_builder_fork_hooks_are_plain_functions(tmp_path):
    parent = os.getpid()
    before = []
    p = mg.Pipeline("builder-forks")
    p.producer(lambda: [[1, 2], [3]], name="batches")

    @p.processor(strategy="spawn_fork")
    def work(items):
        return sum(items)

    p.consumer(lambda x: None, name="sink")

    @p.before_fork
    def note_fork():
        before.append(os.getpid())

    @p.after_fork("work")
    def in_child():
        (tmp_path / f"child-{os.getpid()}").write_text(str(os.getppid()))

    p.run()
    assert before == [parent, parent]
    children = list(tmp_path.glob("child-*"))
    assert len(children) == 2
    assert all(f.read_text() == str(parent) for f in children)
    assert all(int(f.name.split("-")[1]) != parent for f in children)
