import logging
import os
import sys

import pytest

import minigun as mg

# Make ``from _mg_helpers import ...`` work whatever pytest's import mode is.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def mg_caplog(caplog, monkeypatch):
    """``caplog`` capturing WARNING and above from the ``minigun`` logger, even if the
    package switched propagation off."""
    logger = logging.getLogger("minigun")
    monkeypatch.setattr(logger, "propagate", True)
    caplog.set_level(logging.WARNING, logger="minigun")
    return caplog


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session (starting one takes seconds): minigun's Ray
    stages join it, as they join any Ray the process already has. Its workers import from
    this process's sys.path."""
    ray = pytest.importorskip("ray", reason="needs ray (the [ray] extra)")
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}},
    )
    # One run of each Ray strategy first: Ray starts the worker processes its first
    # actors and tasks use, so the tests' timings (cancel within 1 s) are not of that.
    for strategy in ("ray", "spawn_ray"):
        got = []
        warm_up = mg.Pipeline("warm-up")
        warm_up.producer(lambda: [1, 2], name="source")
        warm_up.processor(_ray_probe, name="probe", strategy=strategy)
        warm_up.consumer(got.append, name="sink")
        warm_up.run()
        assert sorted(got) == [1, 2], got
    yield ray
    ray.shutdown()


def _ray_probe(x):
    return x
