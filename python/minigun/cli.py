"""The command line: ``python -m minigun run|dag MODULE:TASK`` and ``python -m minigun demo``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from .errors import MinigunError


def load(target: str) -> Any:
    """Import ``MODULE:ATTR`` and return the attribute (a Task class, instance or Pipeline)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"minigun: expected MODULE:TASK (for example jobs.etl:Nightly), "
                         f"got {target!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SystemExit(f"minigun: module {module_name!r} has no {attr!r}") from None
    return obj


def _runnable(obj: Any) -> Any:
    from .dsl import Task  # noqa: PLC0415

    if isinstance(obj, type) and issubclass(obj, Task):
        return obj()
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minigun", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run a Task and print its summary")
    run_p.add_argument("target", metavar="MODULE:TASK")
    dag_p = sub.add_parser("dag", help="print a Task's graph as a Mermaid flowchart")
    dag_p.add_argument("target", metavar="MODULE:TASK")
    demo_p = sub.add_parser("demo", help="run the bundled example job")
    demo_p.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args(argv)

    try:
        if args.command == "demo":
            from .demo import main as demo_main  # noqa: PLC0415

            return demo_main(args.records)
        obj = load(args.target)
        if args.command == "dag":
            print(obj.to_mermaid(), end="")
            return 0
        result = _runnable(obj).run()
        print(result.summary())
        return 0
    except MinigunError as exc:
        print(f"minigun: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
