"""The extension stays in the main interpreter: ``import minigun`` and defining a Task work
in a subinterpreter (a subinterpreter worker unpickles the Task) without loading it."""

from __future__ import annotations

import pytest

import minigun as mg
from minigun import native

_IN_SUBINTERPRETER = """
import sys
import minigun as mg

class Job(mg.Task):
    @mg.producer
    def numbers(self):
        yield 1

    @mg.consumer
    def sink(self, x):
        pass

assert "minigun._minigun" not in sys.modules, "the extension was loaded"
assert mg.native.in_subinterpreter()
try:
    mg.native.ext.Runtime([])
except mg.MinigunError as exc:
    assert "subinterpreter" in str(exc), exc
else:
    raise AssertionError("the runtime stand-in did not refuse")
"""


def test_import_and_task_definition_work_in_a_subinterpreter_without_the_extension():
    _interpreters = pytest.importorskip("_interpreters", reason="needs CPython 3.13+")
    interp = _interpreters.create()
    try:
        failure = _interpreters.exec(interp, _IN_SUBINTERPRETER)
    finally:
        _interpreters.destroy(interp)
    assert failure is None, getattr(failure, "formatted", failure)


def test_the_main_interpreter_has_the_real_runtime():
    assert not native.in_subinterpreter()
    assert mg.Pipeline("p") is not None
    assert hasattr(native.ext, "Runtime") and native.ext.__name__ == "minigun._minigun"
