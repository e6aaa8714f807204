"""The typed boundary between the Python layer and the Rust runtime (minigun.native's
StageSpec, src/spec.rs): both sides name the same fields, and a bad value is a
DefinitionError naming the stage and the field."""

from __future__ import annotations

import pathlib
import re
import typing

import pytest

import minigun as mg
from minigun.native import StageSpec, ext

SPEC_RS = pathlib.Path(__file__).resolve().parent.parent / "src" / "spec.rs"


def _spec(**changes: object) -> dict[str, object]:
    """A valid spec of a producer, with ``changes``."""
    spec: dict[str, object] = {
        "name": "numbers",
        "kind": "producer",
        "call": lambda: iter(()),
        "mode": "iterate",
        "make_worker": None,
        "workers": 1,
        "spawn_per_item": False,
        "inline": False,
        "queue_size": 10,
        "min_chunk": 1,
        "downstream": [],
        "routing": "broadcast",
        "route_names": {},
        "route_error": lambda name: RuntimeError(name),
        "retries": 0,
        "retry_on": (Exception,),
        "retry_backoff": 0.0,
        "on_failure": lambda error, item, stage: False,
        "on_finish": None,
        "auto_start": True,
        "max_size": 100,
        "max_all": 1000,
        "check_interval": 100,
        "max_wait": None,
        "key": None,
    }
    spec.update(changes)
    return spec


def test_python_and_rust_name_the_same_fields():
    rust = set(re.findall(r'f\.(?:get|name)\("(\w+)"\)', SPEC_RS.read_text()))
    assert rust == set(typing.get_type_hints(StageSpec)) == set(_spec())


def test_a_valid_spec_runs():
    runtime = ext.Runtime([_spec()])
    runtime.start()
    assert runtime.wait(5.0)
    runtime.join()
    assert runtime.failure() is None


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("kind", "transformer", '"transformer" is not one of "producer"'),
        ("mode", "each", '"each" is not one of "value"'),
        ("routing", "random", '"random" is not one of "broadcast"'),
        ("workers", -1, "negative"),
        ("queue_size", 2**64, "queue_size"),
        ("retries", "3", "retries"),
    ],
)
def test_a_bad_value_names_the_stage_and_the_field(field, value, says):
    with pytest.raises(mg.DefinitionError) as caught:
        ext.Runtime([_spec(**{field: value})])
    message = str(caught.value)
    assert message.startswith(f'stage "numbers": invalid {field}: '), message
    assert says in message


def test_a_missing_field_is_named():
    spec = _spec()
    del spec["max_all"]
    with pytest.raises(mg.DefinitionError, match=r'stage "numbers": invalid max_all: .*missing'):
        ext.Runtime([spec])
