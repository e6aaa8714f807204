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
