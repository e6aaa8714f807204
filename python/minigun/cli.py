"""The command line (API.md section 9): ``python -m minigun run|dag|demo``.

Every user mistake (a target that cannot be imported or is not a job, constructor
arguments that do not fit, a job defined wrongly) is one line on stderr and exit status 2;
a run that fails prints its summary and exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import logging
import sys
from typing import Any

from . import __version__
from .demo import main as demo_main
from .dsl import Task
from .errors import DefinitionError, MinigunError, PipelineError
from .pipeline import Pipeline
from .stats import RunResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A mistake on the command line: reported as one line, exit status 2."""


def load(target: str) -> Any:
    """Import ``MODULE:ATTR`` and return the attribute (a Task class, instance or Pipeline)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:TASK (for example jobs.etl:Nightly), got {target!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # as `python -m` does: jobs in the current directory
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise UsageError(
                f"no module named {exc.name!r} (from {target!r}); run from the "
                "directory that contains it, or fix PYTHONPATH"
            ) from None
        raise UsageError(f"importing {module_name!r} failed: {exc}") from None
    except DefinitionError:
        raise
    except SyntaxError as exc:
        raise UsageError(f"{module_name!r} has a syntax error: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no {attr!r}") from None
    return obj


def parse_args(pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs as keyword arguments; values are Python literals where they
    parse as one (``3``, ``[1, 2]``, ``None``), else strings."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(f"--arg takes NAME=VALUE, got {pair!r}")
        try:
            kwargs[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            kwargs[name] = text
    return kwargs


def runnable(obj: Any, target: str, kwargs: dict[str, Any]) -> Task | Pipeline:
    """The job ``obj`` names: a Task instance (a Task class is built with ``kwargs``) or a
    Pipeline."""
    if isinstance(obj, type) and issubclass(obj, Task):
        try:
            inspect.signature(obj).bind(**kwargs)
        except TypeError as exc:
            raise UsageError(
                f"{obj.__name__}{_signature(obj)}: {exc}; pass constructor "
                "arguments with --arg NAME=VALUE"
            ) from None
        return obj(**kwargs)
    if isinstance(obj, (Task, Pipeline)):
        if kwargs:
            raise UsageError(
                f"{target} is already built ({type(obj).__name__}); --arg applies to a Task class"
            )
        return obj
    raise UsageError(f"{target} is a {type(obj).__name__}, not a minigun Task or Pipeline")


def _signature(cls: type) -> str:
    try:
        return str(inspect.signature(cls))
    except (TypeError, ValueError):
        return "(...)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigun",
        description="Run minigun jobs: composable, high-throughput data pipelines.",
        epilog="Examples: minigun run jobs.etl:Nightly --progress --arg day=3; "
        "minigun dag jobs.etl:Nightly; minigun demo --records 100000",
    )
    parser.add_argument("--version", action="version", version=f"minigun {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log the minigun logger at DEBUG level to stderr",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_p = sub.add_parser(
        "run",
        help="run a Task (or a module-level Pipeline) and print its summary",
        description="Run a Task (or a module-level Pipeline) and print "
        "its summary. Exit status: 0 ok, 1 failed, 2 a "
        "mistake in the command, 130 interrupted.",
    )
    run_p.add_argument("target", metavar="MODULE:TASK", help="for example jobs.etl:Nightly")
    run_p.add_argument("--progress", action="store_true", help="show live progress on stderr")
    run_p.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON (RunResult.to_dict()) instead of the summary",
    )
    run_p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a constructor argument of the Task; VALUE is read as a Python "
        "literal if it is one, else as a string (repeatable)",
    )

    dag_p = sub.add_parser(
        "dag",
        help="print a job's graph as a Mermaid flowchart",
        description="Print a job's graph as a Mermaid flowchart.",
    )
    dag_p.add_argument("target", metavar="MODULE:TASK")

    demo_p = sub.add_parser(
        "demo",
        help="run the bundled example job on a SQLite database",
        description="Run the bundled example job: an ETL over a SQLite "
        "database file, then print its summary and the row "
        "count read back from the database.",
    )
    demo_p.add_argument(
        "--db", metavar="PATH", help="the database file to use (default: a temporary one)"
    )
    demo_p.add_argument(
        "--records",
        type=int,
        default=300_000,
        metavar="N",
        help="orders to generate (default: 300000)",
    )
    demo_p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live progress (default: on when stdout is a terminal)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("minigun").setLevel(logging.DEBUG)
    try:
        return _command(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except DefinitionError as exc:
        return _fail(f"DefinitionError: {exc}", EXIT_USAGE)
    except PipelineError as exc:
        if exc.result is not None:
            _report(exc.result, getattr(args, "json", False))
        return _fail(f"PipelineError: {exc}", EXIT_FAILED)
    except MinigunError as exc:
        return _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)


def _command(args: argparse.Namespace) -> int:
    if args.command == "demo":
        if args.records < 1:
            raise UsageError(f"--records must be at least 1, got {args.records}")
        show = sys.stdout.isatty() if args.progress is None else args.progress
        return demo_main(args.records, db=args.db, progress=show)
    obj = load(args.target)
    if args.command == "dag":
        if not isinstance(obj, (Task, Pipeline)) and not (
            isinstance(obj, type) and issubclass(obj, Task)
        ):
            raise UsageError(
                f"{args.target} is a {type(obj).__name__}, not a minigun Task or Pipeline"
            )
        print(obj.to_mermaid(), end="")
        return EXIT_OK
    job = runnable(obj, args.target, parse_args(args.arg))
    result = job.run(progress=True) if args.progress else job.run()
    _report(result, args.json)
    return EXIT_OK if result.ok else EXIT_FAILED


def _report(result: RunResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary())
    sys.stdout.flush()


def _fail(message: str, status: int) -> int:
    print(f"minigun: {message}", file=sys.stderr)
    return status
