"""The Ray executors: ``ray`` (``actors=N`` long-lived Ray actors per stage, one per Rust
worker thread, created at its first chunk) and ``spawn_ray`` (a Ray task per input item,
at most ``max_ray_tasks`` in flight per pipeline scope).

Ray is the engine: minigun only places a stage's worker loop (:mod:`minigun.ray_worker`)
on it. A run that uses Ray joins the Ray of the process when the user started one;
otherwise it starts a local Ray sized to the machine (``ray_address=None``) or connects to
the cluster named by ``ray_address``, and shuts that down (disconnects) when it ends.

Items go to an actor in the runtime's chunks, one remote call per chunk, and each Rust
worker thread waits for its call's reply before it sends the next: one chunk in flight
per actor, so back-pressure holds. The reply is the frames a fork_ipc child would write
(:mod:`minigun.worker_reply` reads both alike): per-item outcomes, retries, what each item
emitted. While it waits, the thread checks every ``_POLL`` seconds whether the run is
stopping; then the actors the run created are killed, and so are actors that die (their
chunk's items fail with a ``WorkerError``, and the next chunk gets a fresh actor).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import log
from . import worker_loop as loop
from .budget import BudgetPlan, Outcome, Slots, WorkerKind
from .errors import DefinitionError, WorkerError
from .graph import Node
from .native import ext
from .plan import StagePlan
from .ray_worker import StageActor, run_item
from .work import PerRun, Run, StageCode, Work
from .worker_job import WorkerJob, job_of
from .worker_reply import ChunkReply, read_reply, split_picklable, worker_exception

#: How often a thread waiting for Ray checks whether its run is stopping.
_POLL = 0.05
#: Seconds a stopping run's actor gets to leave its chunk and close its worker (a custom
#: Stage's close()) before it is killed.
GRACE = 1.0
#: Seconds a stopping run's spawn_ray task gets to end on its own before it is cancelled.
#: A cancel that lands while Ray takes in the task's reply aborts Ray's driver (Ray 2.60:
#: "Check failed: ... Tried to complete task that was not pending"); without this wait, a
#: run stopping among short tasks cancels many of them at about their end. Now most of
#: those end within it, and are not cancelled.
SETTLE = 0.1
#: The longest a run's end waits for Ray to report its actors gone: a kill is asynchronous,
#: and an actor's name stays listed until Ray's control store has ended it (tens of ms).
GONE_TIMEOUT = 5.0

#: ``max_ray_tasks`` per scope, shared by the spawn_ray stages in it (no actor counts).
RAY_TASKS = WorkerKind("max_ray_tasks", "", "spawn_ray", "Ray tasks", "spawn_ray")


@functools.cache
def _ray() -> Any:
    """Ray, imported at the first Ray stage: it is an optional dependency, and importing
    it takes about a second."""
    return importlib.import_module("ray")


def _local_runtime_env(given: dict[str, Any] | None) -> dict[str, Any]:
    """A local Ray's workers import what this process can: its ``sys.path`` goes to them
    as ``PYTHONPATH`` (unless the user's runtime_env sets it)."""
    env = dict(given or {})
    env_vars = dict(env.get("env_vars") or {})
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env_vars.setdefault("PYTHONPATH", os.pathsep.join(paths))
    env["env_vars"] = env_vars
    return env


class _RaySession:
    """A run's use of Ray: the connection (made here unless the process had one), the
    remote classes, the actors the run created and its ``max_ray_tasks`` books."""

    def __init__(self, run: Run) -> None:
        ray = _ray()
        # The outermost pipeline's: where a run's Ray is, is one choice for the whole run.
        settings = run.graph.root.settings
        self.connected_here = False
        if not ray.is_initialized():
            address = settings["ray_address"]
            runtime_env = settings["ray_runtime_env"]
            if address is None:
                ray.init(
                    num_cpus=os.cpu_count(),
                    include_dashboard=False,
                    runtime_env=_local_runtime_env(runtime_env),
                )
            else:
                ray.init(address=address, runtime_env=runtime_env)
            self.connected_here = True
        self.actor_class = ray.remote(StageActor)
        self.item_task = ray.remote(run_item)
        self.plan = BudgetPlan(run.graph, run.plans, RAY_TASKS)
        self.slots = Slots(self.plan)
        self._actors: set[Any] = set()
        #: Of those, the actors that are up (sent their first message, or about to be).
        self._up: set[Any] = set()
        #: The names of every actor the run created, alive or not.
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def new_actor(self, job: WorkerJob) -> Any:
        """A new actor for ``job``, not yet known to be up: send it nothing before
        :meth:`is_up` says it is."""
        # Named, so the Ray dashboard (and ray.util.list_named_actors) shows whose it is.
        # Two concurrent calls: the chunk, and abandon() reaching it mid-chunk (ray_worker).
        name = f"minigun:{job.path}:{uuid.uuid4().hex[:12]}"
        actor = self.actor_class.options(name=name, max_concurrency=2).remote(job)
        with self._lock:
            self._actors.add(actor)
            self._names.add(name)
        return actor

    def is_up(self, actor: Any) -> None:
        """``actor``'s process is up (Ray's ``__ray_ready__`` answered): it may be sent
        messages now, and the first of them opens its worker."""
        with self._lock:
            self._up.add(actor)

    def kill(self, actor: Any) -> None:
        with self._lock:
            self._actors.discard(actor)
            self._up.discard(actor)
        try:
            _ray().kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - gone already
            pass

    def abandon(self, actor: Any) -> None:
        """End the actor of a stopping run.

        An actor that is up may be in a chunk, its worker opened, even if it never
        replied: it is told to leave the chunk before the next item and close its worker,
        gets up to GRACE seconds for it, and is then killed. An actor that is not up was
        sent nothing (nothing is, before it is up), so it opened nothing: it is killed at
        once, however long Ray would take to start it."""
        with self._lock:
            up = actor in self._up
        if up:
            try:
                _ray().wait([actor.abandon.remote()], timeout=GRACE)
            except Exception:  # noqa: BLE001 - dead already: killing it is all there is
                pass
        self.kill(actor)

    def finish(self) -> None:
        """Kill what the run left (a cancelled run's actors) and wait until Ray no longer
        lists any actor of the run, then disconnect if the run connected: when ``run()``
        returns, none of its actors is alive (docs/ray.md)."""
        with self._lock:
            left, self._actors = list(self._actors), set()
        for actor in left:
            self.abandon(actor)
        self._wait_gone()
        if self.connected_here:
            _ray().shutdown()

    def _wait_gone(self) -> None:
        if not self._names:
            return  # spawn_ray's tasks only: no actor to ask Ray about
        ray = _ray()
        deadline = time.monotonic() + GONE_TIMEOUT
        while listed := self._names & set(ray.util.list_named_actors()):
            if time.monotonic() > deadline:
                log.warning("Ray still lists actor(s) %s after killing them", sorted(listed))
                return
            time.sleep(0.01)


_runs: PerRun[_RaySession] = PerRun(_RaySession, finish=_RaySession.finish)


def _job(run: Run, node: Node, plan: StagePlan) -> WorkerJob:
    """The stage's job, checked now: Ray copies it with cloudpickle (what cannot be
    imported by name is copied by value), and what cloudpickle refuses is a
    DefinitionError before anything runs."""
    job = job_of(node, plan, run.graph.route_error(node))
    try:
        _ray().cloudpickle.dumps(job)
    except Exception as exc:  # noqa: BLE001 - every cause gets the same advice
        raise DefinitionError(
            f"stage {node.path!r} runs on Ray, which copies its code and its Task instance "
            f"to the workers with cloudpickle, but that failed: {type(exc).__name__}: {exc}. "
            "Make the Task's attributes picklable (or give it __getstate__ to leave "
            "parent-only state out), or open such things in a before_worker hook"
        ) from exc
    return job


class _RayCalls:
    """Waiting for Ray and reading its replies, for one stage."""

    def __init__(self, run: Run, session: _RaySession, path: str) -> None:
        self.run = run
        self.session = session
        self.path = path

    def submit(
        self, method: Any, items: list[Any]
    ) -> tuple[Any, list[Any], list[tuple[Any, BaseException]]]:
        """Send the chunk ``items`` to an actor's ``method``: the call's ref (None when no
        item is left), the items it carries, and the failures of those Ray cannot
        serialize (each fails alone, as a fork_ipc item that cannot be pickled does)."""
        try:
            return method.remote((loop.CHUNK, (items, False))), items, []
        except TypeError:  # Ray: "Could not serialize the argument ..."
            kept, refused = split_picklable(
                self.path,
                items,
                "a Ray worker",
                "or use strategy='threads'",
                _ray().cloudpickle.dumps,
            )
            ref = method.remote((loop.CHUNK, (kept, False))) if kept else None
            return ref, kept, refused

    def wait(self, ref: Any) -> Any:
        """The result of ``ref``; RunStopping once the run is stopping."""
        ray = _ray()
        while not ray.wait([ref], timeout=_POLL)[0]:
            if self.run.stopping:
                raise ext.RunStopping(f"stage {self.path!r}: the run is stopping")
        return ray.get(ref)

    def lost(self, exc: BaseException, what: str) -> BaseException:
        """The error of items whose ``what`` ("Ray actor") failed without a reply: Ray's
        own cause where it wraps one (a RayTaskError), else a WorkerError."""
        ray = _ray()
        if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
            cause: BaseException = exc.cause
            cause.add_note(f"[minigun] raised in the {what} of stage {self.path!r}:\n{exc}")
            return cause
        error = WorkerError(
            f"stage {self.path!r}: its {what} failed before it replied "
            f"({type(exc).__name__}: {exc})"
        )
        error.__cause__ = exc
        return error

    def read(
        self, frames: list[bytes], reply: ChunkReply, where: str
    ) -> tuple[str, BaseException | None]:
        """Hand a reply's frames to ``reply``: its last tag, and the error of a reply that
        failed as a whole (worker_reply.read_reply)."""
        return read_reply(frames, reply.take, functools.partial(worker_exception, self.path, where))


class _ActorWorker:
    """One Rust worker thread's Ray actor, created at its first chunk."""

    def __init__(self, calls: _RayCalls, job: Any) -> None:
        self.calls = calls
        self.job = job
        self.actor: Any = None

    def _where(self) -> str:
        return "Ray actor"

    def _start(self) -> BaseException | None:
        """Make the actor and wait until it is up: None, or why it could not start."""
        calls = self.calls
        if calls.run.stopping:
            raise ext.RunStopping(f"stage {calls.path!r}: the run is stopping")
        self.actor = calls.session.new_actor(self.job)
        _, failed = self._wait(self.actor.__ray_ready__.remote())
        if failed is None:
            calls.session.is_up(self.actor)
        return failed

    def _wait(self, ref: Any) -> tuple[Any, BaseException | None]:
        """``(the result of ref, None)``, or ``(None, the error)`` when the actor died or
        its call broke (the actor is then dropped). The run stopping first abandons the
        actor and raises RunStopping."""
        calls = self.calls
        try:
            return calls.wait(ref), None
        except ext.RunStopping:
            self._drop(stopping=True)
            raise
        except Exception as exc:  # noqa: BLE001 - the actor died or its call broke
            self._drop()
            return None, calls.lost(exc, "Ray actor")

    def call(self, items: list[Any]) -> Outcome:
        calls = self.calls
        if self.actor is None:
            failed = self._start()
            if failed is not None:
                return 0, [(item, failed) for item in items]
        ref, items, refused = calls.submit(self.actor.handle, items)
        if ref is None:
            return 0, refused
        reply = ChunkReply(calls.path, self._where, items, ext.emit)
        frames, lost = self._wait(ref)
        if lost is not None:
            return 0, refused + [(item, lost) for item in items]
        tag, broken = calls.read(frames, reply, self._where())
        failures = refused + reply.failures
        if broken is not None:  # the worker broke (a fatal reply): its chunk is lost
            self._drop()
            raise broken
        if tag == loop.RETIRED:
            self._drop()  # it could not start: the next chunk gets a fresh actor
        return (reply.retries, failures) if reply.retries or failures else None

    def _drop(self, stopping: bool = False) -> None:
        actor, self.actor = self.actor, None
        if actor is None:
            return
        if stopping:
            self.calls.session.abandon(actor)
        else:
            self.calls.session.kill(actor)

    def close(self) -> None:
        """Close the stage's worker in the actor (what close() emits goes downstream),
        then end the actor; when the run is stopping, kill it."""
        if self.actor is None:
            return
        calls = self.calls
        if calls.run.stopping:
            self._drop(stopping=True)
            return
        reply = ChunkReply(calls.path, self._where, [], ext.emit)
        try:
            frames = calls.wait(self.actor.handle.remote((loop.CLOSE, None)))
        finally:
            self._drop()
        _, error = calls.read(frames, reply, self._where())
        if error is not None:
            raise error
        reply.deliver()


def ray_executor(run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work:
    """``ray``: a long-lived Ray actor per worker thread. ``code`` (the in-process
    closures) is not used: the actor rebuilds the stage from its job."""
    job = _job(run, node, plan)
    calls = _RayCalls(run, _runs.of(run), node.path)

    def make_worker() -> tuple[Callable[[list[Any]], Outcome], Callable[[], None]]:
        worker = _ActorWorker(calls, job)
        return worker.call, worker.close

    return Work(call=None, mode="chunk", make_worker=make_worker, threads=plan.workers)


def spawn_ray_executor(run: Run, node: Node, plan: StagePlan, code: StageCode) -> Work:
    """``spawn_ray``: a Ray task per item (its worker: opened, given the item, closed), at
    most ``max_ray_tasks`` in flight per pipeline scope."""
    session = _runs.of(run)
    calls = _RayCalls(run, session, node.path)
    job_ref = _ray().put(_job(run, node, plan))
    scopes = [id(s) for s in node.scope.lineage()]
    threads = max(1, min(plan.workers, session.plan.most_workers(scopes)))
    path = node.path

    def stopping() -> bool:
        return run.stopping

    def one(item: Any) -> Outcome:
        reply = ChunkReply(path, lambda: "Ray task", [item], ext.emit)
        try:
            ref = session.item_task.remote(job_ref, item)
        except TypeError:  # Ray: "Could not serialize the argument ..."
            _, refused = split_picklable(
                path, [item], "a Ray task", "or use strategy='threads'", _ray().cloudpickle.dumps
            )
            if not refused:
                raise
            return 0, refused
        try:
            item_frames, close_frames = calls.wait(ref)
        except ext.RunStopping:
            # A task still running after SETTLE is interrupted (KeyboardInterrupt in the
            # task); its worker still closes, and the run ends only once it has (or GRACE
            # is spent).
            ray = _ray()
            if not ray.wait([ref], timeout=SETTLE)[0]:
                ray.cancel(ref)
                ray.wait([ref], timeout=GRACE)
            raise
        except Exception as exc:  # noqa: BLE001 - the task's worker died
            return 0, [(item, calls.lost(exc, "Ray task"))]
        _, error = calls.read(item_frames, reply, "Ray task")
        failures = list(reply.failures) or ([(item, error)] if error is not None else [])
        closed = ChunkReply(path, lambda: "Ray task", [], ext.emit)
        _, close_error = calls.read(close_frames, closed, "Ray task")
        if close_error is not None and not failures:
            failures = [(item, close_error)]
        elif close_error is None:
            closed.deliver()  # what close() emitted
        return (reply.retries, failures) if reply.retries or failures else None

    def stopped() -> BaseException:
        return ext.RunStopping(f"stage {path!r}: the run is stopping")

    def call(items: list[Any]) -> Outcome:
        return session.slots.each(path, scopes, items, one, stopping, stopped)

    return Work(call=call, mode="chunk", make_worker=None, threads=threads)


__all__ = ["ray_executor", "spawn_ray_executor"]
