"""Rendering a compiled graph as a Mermaid ``flowchart`` (``Task.to_mermaid()``)."""

from __future__ import annotations

from .graph import Graph, Node, Scope
from .kinds import ACCUMULATOR, PRODUCER
from .plan import StagePlan, plan_stages

_ESCAPES = {
    "&": "#amp;",
    '"': "#quot;",
    "<": "#lt;",
    ">": "#gt;",
    "|": "#124;",
    "[": "#91;",
    "]": "#93;",
    "{": "#123;",
    "}": "#125;",
    "`": "#96;",
}


def escape(text: str) -> str:
    """Make ``text`` safe inside a quoted Mermaid label."""
    return "".join(_ESCAPES.get(ch, ch) for ch in text).replace("\n", " ")


def _label(node: Node, plan: StagePlan) -> str:
    stage = node.stage
    kind = (
        "consumer"
        if not node.downstream and stage.kind not in (PRODUCER, ACCUMULATOR)
        else stage.kind
    )
    detail = (
        kind
        if stage.kind in (PRODUCER, ACCUMULATOR)
        else f"{kind} · {plan.strategy} ×{plan.workers}"
    )
    if stage.kind == ACCUMULATOR:
        size = getattr(stage, "max_size", None) or node.scope.settings["accumulator_max_single"]
        detail += f" · max {size}"
    return f"{escape(node.local)}<br/>{escape(detail)}"


def render(graph: Graph) -> str:
    plans = plan_stages(graph)
    lines = ["flowchart TD"]
    subgraph_ids: dict[int, str] = {}

    def emit_scope(scope: Scope, indent: str) -> None:
        for name, _stage in scope.members.items():
            if name in scope.children:
                child = scope.children[name]
                sid = subgraph_ids.setdefault(id(child), f"s{len(subgraph_ids)}")
                lines.append(f'{indent}subgraph {sid}["{escape(name)}"]')
                emit_scope(child, indent + "  ")
                lines.append(f"{indent}end")
            else:
                node = graph.by_path[scope.qualified(name)]
                shape = ('(["', '"])') if node.stage.kind == PRODUCER else ('["', '"]')
                lines.append(
                    f"{indent}n{node.index}{shape[0]}{_label(node, plans[node.path])}{shape[1]}"
                )

    emit_scope(graph.root, "  ")
    for node in graph.nodes:
        arrow = (
            "-.->" if node.stage.routing == "round_robin" and len(node.downstream) > 1 else "-->"
        )
        for d in node.downstream:
            lines.append(f"  n{node.index} {arrow} n{d}")
    return "\n".join(lines) + "\n"
