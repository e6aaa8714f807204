"""Small thread-safe helpers shared by the minigun black-box tests.

Imported by the test modules as ``from _mg_helpers import ...``; ``conftest.py`` puts this
folder on ``sys.path`` so that works under every pytest import mode.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time

import minigun as mg


class Collector:
    """A thread-safe list that stages append to."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items = []
        self._cond = threading.Condition(self._lock)

    def add(self, item):
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    @property
    def items(self):
        with self._lock:
            return list(self._items)

    def counter(self):
        return collections.Counter(self.items)

    def __len__(self):
        with self._lock:
            return len(self._items)

    def wait_for(self, n, timeout=5.0):
        """Wait until at least ``n`` items were added; returns whether that happened."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._items) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


class Counts:
    """A thread-safe counter: ``incr(key)`` returns the new count for ``key``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._c = collections.Counter()

    def incr(self, key=None):
        with self._lock:
            self._c[key] += 1
            return self._c[key]

    def __getitem__(self, key):
        with self._lock:
            return self._c[key]

    def snapshot(self):
        with self._lock:
            return collections.Counter(self._c)


class Concurrency:
    """Measures how many threads are inside a ``with`` block at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def __enter__(self):
        with self._lock:
            self.current += 1
            self.peak = max(self.peak, self.current)
        return self

    def __exit__(self, *exc):
        with self._lock:
            self.current -= 1
        return False


def wait_until(predicate, timeout=5.0, interval=0.01):
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def minigun_warnings(records, needle=None):
    """Records of WARNING or above logged on the ``minigun`` logger (or a child of it),
    optionally only those whose message contains ``needle``."""
    out = []
    for r in records:
        if r.levelno < logging.WARNING:
            continue
        if r.name != "minigun" and not r.name.startswith("minigun."):
            continue
        if needle is not None and needle not in r.getMessage():
            continue
        out.append(r)
    return out


def subprocess_env(*extra_paths):
    """Environment for a child ``python`` that must import minigun and the given folders."""
    import minigun

    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(minigun.__file__)))
    paths = [str(p) for p in extra_paths] + [pkg_parent]
    old = os.environ.get("PYTHONPATH")
    if old:
        paths.append(old)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


# -- what a run leaves behind: fds, OS threads, child processes --------------------------------


def open_fds():
    """This process's open file descriptors, each with what it points to (so a number the
    kernel reused for something else still counts as new)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor of the listing itself, closed by now
    return set(fds.items())


def os_threads():
    """Ids of this process's OS threads (Rust threads included, unlike threading)."""
    return set(os.listdir("/proc/self/task"))


def child_processes():
    """Pids of this process's children, zombies included (scans /proc: no psutil, and
    /proc/<pid>/task/*/children is not built into every kernel)."""
    me = os.getpid()
    children = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == me:
            children.add(int(name))
    return children


class LeftBehind:
    """Snapshot of fds, threads and children now; ``new()`` says what appeared since."""

    def __init__(self):
        self.fds = open_fds()
        self.threads = os_threads()
        self.children = child_processes()

    def new(self):
        left = {}
        fds = open_fds() - self.fds
        threads = os_threads() - self.threads
        children = child_processes() - self.children
        if fds:
            left["fds"] = sorted(fds)
        if threads:
            left["threads"] = sorted(threads)
            left["python threads"] = [t.name for t in threading.enumerate()]
        if children:
            left["children"] = sorted(children)
        return left

    def assert_nothing_new(self, settle=2.0):
        """Fail unless everything that appeared since the snapshot is gone within
        ``settle`` seconds (threads and children take a moment to end; fds are closed by
        then, by the run or by its ending threads, so they get no grace of their own)."""
        # Polled often: a runtime thread parks for 5 ms after its work before it ends.
        wait_until(
            lambda: not (os_threads() - self.threads) and not (child_processes() - self.children),
            timeout=settle,
            interval=0.002,
        )
        if wait_until(lambda: not self.new(), timeout=0.05):
            return
        left = self.new()
        assert not left, f"left behind after the run: {left}"


def minigun_ray_actors():
    """The Ray actors minigun created that are alive (it names them "minigun:<stage>:<id>");
    [] where this process has no Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return []
    return [name for name in ray.util.list_named_actors() if name.startswith("minigun:")]


def assert_nothing_left_on_ray(before, settle=2.0):
    """What a run on Ray must leave: no actor of minigun's alive and no child process. (A
    Ray driver starts and ends threads and sockets of its own as it goes, so this
    process's threads and fds say nothing about the run.)"""
    assert wait_until(lambda: not minigun_ray_actors(), timeout=settle), minigun_ray_actors()
    new_children = child_processes() - before.children
    assert not new_children, f"child processes left behind: {sorted(new_children)}"


# -- stage functions whose failed attempt emitted first (its output must never arrive) ----


def emits_then_fails(x):
    mg.emit(("early", x))
    if x % 2:
        raise ValueError(x)
    return ("out", x)


def yields_then_fails(x):
    yield ("early", x)
    if x % 2:
        raise ValueError(x)
    yield ("out", x)
