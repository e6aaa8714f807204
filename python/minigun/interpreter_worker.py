"""What runs inside a subinterpreter worker: the stage's job served over pipes.

The parent (:mod:`minigun.interpreters`) creates the subinterpreter, binds a few plain
values into its ``__main__`` (the job's bytes, three pipe fds, the parent's ``sys.path``
and main module) and runs :data:`BOOT` there on a thread of its own. From then on the
worker is the same pure-Python loop a fork_ipc child runs (:func:`minigun.worker_loop.serve`):
chunks in, values and per-item outcomes out, one frame each way per chunk. The only
difference is how it stops: nobody can kill a subinterpreter, so before each item it reads
a stop flag (one byte of memory it shares with the parent, a memfd both map) and leaves
the rest of its chunk once the parent has set it.

Like the worker loop, this module never imports the extension.
"""

from __future__ import annotations

import importlib.util
import mmap
import pickle
import sys
from typing import Any

from . import context
from . import worker_loop as loop
from .config import RetryPolicy
from .errors import WorkerError
from .worker_job import Call, Close, WorkerJob

#: The code the parent runs in a new subinterpreter (the names are bound by the parent).
BOOT = """\
import sys
sys.path[:] = _minigun_sys_path
from minigun.interpreter_worker import serve_job
serve_job(_minigun_job, _minigun_stage, _minigun_fds, _minigun_main)
"""

#: The bytes of the stop flag's memfd (its first byte is the flag).
STOP_FLAG_SIZE = 1

#: The module name the parent's ``__main__`` takes in a worker (as in multiprocessing), so
#: that its ``if __name__ == "__main__":`` block does not run again there.
MAIN_ALIAS = "__mp_main__"


def serve_job(job: bytes, stage: str, fds: tuple[int, int, int], main: tuple[str, str]) -> None:
    """Serve chunks of ``stage`` until the parent closes the pipe (``fds``: messages in,
    frames out, and the memfd of the stop flag). A job that cannot be loaded (its module
    does not import here) fails every item of its first chunk with a WorkerError naming
    the cause, and retires."""
    receive_fd, send_fd, stop_fd = fds
    out = loop.Outbox(loop.pipe_sender(send_fd), stage, frozenset(), _no_routes(stage))
    hint = _IMPORT_HINT
    try:
        if b"__main__" in job:  # it names something of the script being run
            hint = _MAIN_HINT
            _adopt_main(*main)
            hint = _IMPORT_HINT
        loaded: WorkerJob = pickle.loads(job)
    except BaseException as exc:  # noqa: BLE001 - reported with the first chunk
        start, mode, policy = _cannot_load(stage, exc, hint), "value", RetryPolicy.never()
    else:
        out.routes, out.route_error = loaded.routes, loaded.route_error
        start, mode, policy = loaded.start, loaded.mode, loaded.policy
    context.set_child_emitter(out.emit)
    with mmap.mmap(stop_fd, STOP_FLAG_SIZE) as flag:

        def stopping() -> bool:
            return flag[0] != 0

        loop.serve(loop.pipe_receiver(receive_fd), out, start, mode, policy, stopping)


def _no_routes(stage: str) -> Any:
    def route_error(name: str) -> BaseException:
        return WorkerError(f"stage {stage!r}: emit(to={name!r}) before the worker started")

    return route_error


_IMPORT_HINT = (
    "Everything a stage names must be importable in a fresh interpreter from the parent's "
    "sys.path (a module-level function or class in an importable module)"
)
_MAIN_HINT = (
    "The stage is defined in the script being run, which each worker imports (under the "
    f"name {MAIN_ALIAS!r}); put the code that starts the run under "
    '`if __name__ == "__main__":` so that importing the script only defines things'
)


def _cannot_load(stage: str, exc: BaseException, hint: str) -> loop.Start:
    def start() -> tuple[Call, Close]:
        error = WorkerError(
            f"stage {stage!r}: a subinterpreter worker could not load the stage's code: "
            f"{type(exc).__name__}: {exc}. {hint}"
        )
        raise error from exc

    return start


def _adopt_main(path: str, module: str) -> None:
    """Make the parent's ``__main__`` importable here, under :data:`MAIN_ALIAS`: a job
    that names ``__main__.f`` (a stage defined in the script the user ran) finds ``f``."""
    if module:
        spec = importlib.util.find_spec(module)
    elif path:
        spec = importlib.util.spec_from_file_location(MAIN_ALIAS, path)
    else:
        return  # python -c or an interactive session: nothing to import
    if spec is None or spec.loader is None:
        return
    main = importlib.util.module_from_spec(spec)
    main.__name__ = MAIN_ALIAS
    sys.modules[MAIN_ALIAS] = main
    spec.loader.exec_module(main)
    sys.modules["__main__"] = main
