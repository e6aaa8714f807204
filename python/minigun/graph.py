"""Compiling a pipeline tree into the flat graph the runtime runs.

Nested pipelines are flattened: each stage becomes one :class:`Node` keyed by its dotted
path (``"sub.plus_one"``), and an edge into a nested pipeline becomes edges into its entry
stages (those nothing inside feeds), an edge out of it edges out of its exit stages (those
that feed nothing). Edges follow API.md section 1:

* ``to=`` / ``from_=`` declare edges and replace the implicit ones on the side they declare:
  a stage with ``to=`` has no implicit outgoing edge; a stage named in some ``to=``, or
  declaring ``from_=``, has no implicit incoming edge;
* otherwise a stage feeds the next non-producer stage defined after it, if that stage
  takes implicit input. So in ``gen(to=["a", "b"]); a; b; c`` the siblings ``a`` and ``b``
  are not chained, ``b`` feeds ``c`` and ``a`` ends its branch (give it ``to="c"`` to join).

Names resolve in the stage's own pipeline first, then outward; ``"sub.stage"`` reaches
into a nested pipeline, and a bare name found in exactly one nested pipeline works too.
"""

# No ``from __future__ import annotations`` here: the fields of this module's typed records
# reach ``typing`` as types rather than as strings, each of which it would compile when the
# class is made (20 to 70 µs a field, paid by every ``import minigun``).

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from . import config as _config
from .errors import DefinitionError, RoutingError
from .hooks import HookSet
from .kinds import PIPELINE, PRODUCER
from .stage import NestedStage, Stage

Ref = tuple["Scope", str]


class Scope:
    """One pipeline of the tree, with the Task instance its stages see as ``self``."""

    def __init__(
        self,
        pipeline: Any,
        owner: Any,
        path: str,
        parent: "Scope | None",
        settings: dict[str, Any],
        hooks: HookSet,
    ) -> None:
        self.pipeline = pipeline
        self.owner = owner
        self.path = path
        self.parent = parent
        self.settings = settings
        self.hooks = hooks
        self.members: dict[str, Stage] = {}
        self.children: dict[str, Scope] = {}

    def qualified(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def bind(self, hook: Any) -> Any:
        """A hook's function, bound to this pipeline's Task instance if it is a method (so
        a subclass's override of the method is what runs)."""
        if hook.attr is not None and self.owner is not None:
            return getattr(self.owner, hook.attr)
        return hook.fn

    def lineage(self) -> "list[Scope]":
        """This scope and its parents, innermost first."""
        out: list[Scope] = []
        s: Scope | None = self
        while s is not None:
            out.append(s)
            s = s.parent
        return out

    def descendants(self) -> "list[Scope]":
        out = []
        for child in self.children.values():
            out.append(child)
            out.extend(child.descendants())
        return out


class Node:
    """One stage of the flat graph."""

    def __init__(self, index: int, path: str, local: str, stage: Stage, scope: Scope) -> None:
        self.index = index
        self.path = path
        self.local = local
        self.stage = stage
        self.scope = scope
        self.downstream: list[int] = []
        self.upstream: list[int] = []
        #: ``emit(to=name)``: each accepted name and the downstream positions it reaches.
        self.route_names: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"<Node {self.index} {self.path!r}>"


class MisroutedEmit(NamedTuple):
    """Builds the RoutingError for an ``emit(to=name)`` a stage may not make. Plain data,
    so a worker in another process or interpreter raises the same error as a thread (its
    bound :meth:`error` pickles as the record and the method's name)."""

    path: str
    local: str
    downstream: tuple[str, ...]
    declared: tuple[str, ...]
    known: frozenset[str]

    def error(self, name: str) -> RoutingError:
        downstream = ", ".join(map(repr, self.downstream)) or "none"
        if name in self.known:
            declared = sorted({*self.declared, *self.downstream, name})
            return RoutingError(
                f"stage {self.path!r} emitted to {name!r}, which is not one of its "
                f"downstream stages ({downstream}); declare the edge with to={declared!r} "
                f"on {self.local!r}"
            )
        return RoutingError(
            f"stage {self.path!r} emitted to {name!r}, but no stage has that name; its "
            f"downstream stages are {downstream}"
        )


class Graph:
    """The flat graph of a pipeline tree: its stages as nodes, in definition order."""

    def __init__(self, root: Scope, nodes: list[Node], by_path: dict[str, Node]) -> None:
        self.root = root
        self.nodes = nodes
        self.by_path = by_path

    def scopes(self) -> list[Scope]:
        return [self.root, *self.root.descendants()]

    def route_error(self, node: Node) -> Callable[[str], RoutingError]:
        """What ``emit(to=name)`` from ``node`` raises for a name it may not send to."""
        return MisroutedEmit(
            path=node.path,
            local=node.local,
            downstream=tuple(self.nodes[d].path for d in node.downstream),
            declared=tuple(node.stage.to),
            known=self._stage_names,
        ).error

    @functools.cached_property
    def _stage_names(self) -> frozenset[str]:
        """Every name ``emit(to=...)`` could mean: each stage's path and local name."""
        return frozenset(self.by_path) | {n.local for n in self.nodes}

    def nodes_in(self, scope: Scope) -> list[Node]:
        """The flat nodes of ``scope`` and of every pipeline nested in it."""
        prefix = scope.path + "." if scope.path else ""
        return [n for n in self.nodes if n.path.startswith(prefix)]


def _nested_target(stage: NestedStage, owner: Any) -> tuple[Any, Any]:
    """The pipeline a nested stage runs and the Task instance its stages see."""
    target = stage.target
    pipeline = target.root_pipeline
    if pipeline is target:  # a Pipeline
        return target, None
    if not isinstance(target, type):  # a Task instance
        return pipeline, target
    # A Task class: one instance per outer instance, made with no arguments.
    if owner is None:
        return pipeline, None
    cache = owner.__dict__.setdefault("_minigun_nested", {})
    if stage.name not in cache:
        try:
            cache[stage.name] = target()
        except TypeError as exc:
            raise DefinitionError(
                f"nested pipeline {stage.name!r}: {target.__name__}() failed ({exc}); nest an "
                f"instance instead: mg.nested({target.__name__}(...), name={stage.name!r})"
            ) from exc
    return pipeline, cache[stage.name]


def build_scope(
    pipeline: Any,
    owner: Any,
    parent: Scope | None,
    path: str,
    overrides: dict[str, Any] | None = None,
) -> Scope:
    own = dict(pipeline.settings_for(owner))
    if overrides:
        own.update(_config.normalize(overrides, f"run() of {pipeline.name!r}"))
    scope = Scope(
        pipeline=pipeline,
        owner=owner,
        path=path,
        parent=parent,
        settings=_config.scope(parent.settings if parent else None, own),
        hooks=pipeline.hooks,
    )
    for stage in pipeline.stages:
        name = stage.name or type(stage).__name__
        if name in scope.members:
            where = f"pipeline {path!r}" if path else f"pipeline {pipeline.name!r}"
            raise DefinitionError(
                f"{where} has two stages named {name!r}; give one of them another name (name=...)"
            )
        if "." in name:
            raise DefinitionError(f"stage name {name!r} may not contain '.'")
        scope.members[name] = stage
        if isinstance(stage, NestedStage):
            sub_pipeline, sub_owner = _nested_target(stage, owner)
            scope.children[name] = build_scope(
                sub_pipeline, sub_owner, scope, scope.qualified(name)
            )
    return scope


def _lookup(scope: Scope, name: str) -> Ref | None:
    if name in scope.members:
        return (scope, name)
    head, dot, rest = name.partition(".")
    if dot and head in scope.children:
        return _lookup(scope.children[head], rest)
    return None


def resolve(scope: Scope, name: str, asking: str) -> Ref:
    """Find the member ``name`` as seen from ``scope``: locally, then outward."""
    for s in scope.lineage():
        found = _lookup(s, name)
        if found:
            return found
        deep = [r for d in s.descendants() if (r := _lookup(d, name))]
        if len(deep) > 1:
            where = ", ".join(sorted(r[0].qualified(r[1]) for r in deep))
            raise DefinitionError(
                f"stage {asking!r}: {name!r} is ambiguous, it matches {where}; use the dotted name"
            )
        if deep:
            return deep[0]
    known = ", ".join(sorted(scope.members)) or "none"
    raise DefinitionError(
        f"stage {asking!r} names {name!r}, but no stage has that name (stages here: {known})"
    )


class _Edges:
    """Member-level edges of every scope, possibly crossing scopes."""

    def __init__(self) -> None:
        self.out: dict[tuple[int, str], list[Ref]] = {}
        self.into: dict[tuple[int, str], list[Ref]] = {}
        self.pairs: list[tuple[Ref, Ref]] = []
        self._seen: set[tuple[tuple[int, str], tuple[int, str]]] = set()

    @staticmethod
    def key(ref: Ref) -> tuple[int, str]:
        # By scope and name, not by Stage object: one Task class nested twice shares them.
        return (id(ref[0]), ref[1])

    def add(self, src: Ref, dst: Ref) -> None:
        pair = (self.key(src), self.key(dst))
        if pair in self._seen:
            return  # the same edge declared from both ends
        self._seen.add(pair)
        self.pairs.append((src, dst))
        self.out.setdefault(self.key(src), []).append(dst)
        self.into.setdefault(self.key(dst), []).append(src)


def _member_edges(root: Scope) -> _Edges:
    edges = _Edges()
    explicitly_fed: set[tuple[int, str]] = set()
    scopes = [root, *root.descendants()]
    for scope in scopes:
        for name, stage in scope.members.items():
            me = (scope, name)
            label = scope.qualified(name)
            for target in stage.to:
                dst = resolve(scope, target, label)
                dst_stage = dst[0].members[dst[1]]
                if dst_stage.kind == PRODUCER:
                    raise DefinitionError(
                        f"stage {label!r} sends to {target!r}, which is a producer; producers "
                        "make items and cannot receive them: remove it from to="
                    )
                edges.add(me, dst)
                explicitly_fed.add(edges.key(dst))
            for source in stage.from_:
                edges.add(resolve(scope, source, label), me)
            if stage.from_:
                explicitly_fed.add(edges.key(me))
            if stage.from_ and stage.kind == PRODUCER:
                raise DefinitionError(
                    f"producer {label!r} declares from_=, but producers cannot receive items"
                )

    # Innermost pipelines first, so a pipeline's own edges decide whether it takes input.
    for scope in reversed(scopes):
        names = list(scope.members)
        for i, name in enumerate(names):
            if scope.members[name].to:
                continue
            following = [n for n in names[i + 1 :] if _takes_implicit_input(edges, scope, n)]
            if following and (id(scope), following[0]) not in explicitly_fed:
                edges.add((scope, name), (scope, following[0]))
    return edges


def _takes_implicit_input(edges: _Edges, scope: Scope, name: str) -> bool:
    """Whether member ``name`` of ``scope`` takes the items of the member before it. A
    producer never does; a nested pipeline does when one of its stages would and nothing
    inside feeds it (its inner edges are known by then)."""
    stage = scope.members[name]
    if stage.kind == PRODUCER:
        return False
    if stage.kind != PIPELINE:
        return True
    child = scope.children[name]
    return any(
        _takes_implicit_input(edges, child, sub) and edges.key((child, sub)) not in edges.into
        for sub in child.members
    )


class _FlatNodes:
    """The stages of a scope tree as flat nodes, and which of them each member (a stage,
    or a nested pipeline) receives items with and sends them from.

    Methods, not functions nested in ``compile_graph``: a nested function that calls
    itself is a reference cycle, left for the garbage collector with everything it
    reaches (a pipeline built per call made the collector run every seventh call)."""

    def __init__(self, root: Scope, edges: _Edges) -> None:
        self.edges = edges
        self.nodes: list[Node] = []
        self._index: dict[tuple[int, str], int] = {}
        self._add(root)

    def _add(self, scope: Scope) -> None:
        for name, stage in scope.members.items():
            if stage.kind == PIPELINE:
                self._add(scope.children[name])
            else:
                node = Node(len(self.nodes), scope.qualified(name), name, stage, scope)
                self.nodes.append(node)
                self._index[(id(scope), name)] = node.index

    def entries(self, ref: Ref) -> list[int]:
        """The nodes that take what is sent to member ``ref``."""
        scope, name = ref
        if scope.members[name].kind != PIPELINE:
            return [self._index[(id(scope), name)]]
        child = scope.children[name]
        return [
            i
            for sub, stage in child.members.items()
            if stage.kind != PRODUCER and (id(child), sub) not in self.edges.into
            for i in self.entries((child, sub))
        ]

    def exits(self, ref: Ref) -> list[int]:
        """The nodes whose items member ``ref`` sends on."""
        scope, name = ref
        if scope.members[name].kind != PIPELINE:
            return [self._index[(id(scope), name)]]
        child = scope.children[name]
        return [
            i
            for sub in child.members
            if (id(child), sub) not in self.edges.out
            for i in self.exits((child, sub))
        ]


def compile_graph(pipeline: Any, owner: Any, overrides: dict[str, Any] | None = None) -> Graph:
    """Flatten and validate ``pipeline`` (run by ``owner``); DefinitionError if it is wrong."""
    root = build_scope(pipeline, owner, None, "", overrides)
    edges = _member_edges(root)

    flat = _FlatNodes(root, edges)
    nodes = flat.nodes

    for src, dst in edges.pairs:
        targets = flat.entries(dst)
        if not targets:
            raise DefinitionError(
                f"{dst[0].qualified(dst[1])!r} receives items from "
                f"{src[0].qualified(src[1])!r}, but none of its stages can take them"
            )
        accepted = {dst[1], dst[0].qualified(dst[1])}
        for s in flat.exits(src):
            node = nodes[s]
            for d in targets:
                if d not in node.downstream:
                    node.downstream.append(d)
                    nodes[d].upstream.append(s)
                pos = node.downstream.index(d)
                for name in accepted | {nodes[d].path, nodes[d].local}:
                    slot = node.route_names.setdefault(name, [])
                    if pos not in slot:
                        slot.append(pos)

    graph = Graph(root, nodes, {n.path: n for n in nodes})
    _check_cycles(graph)
    _check_reachable(graph)
    return graph


def _check_cycles(graph: Graph) -> None:
    state = [0] * len(graph.nodes)  # 0 new, 1 on the stack, 2 done
    for i in range(len(graph.nodes)):
        if state[i] == 0:
            _visit(graph, state, i, [])


def _visit(graph: Graph, state: list[int], i: int, trail: list[int]) -> None:
    """Depth first from node ``i``; DefinitionError at an edge back into ``trail``."""
    state[i] = 1
    trail.append(i)
    for j in graph.nodes[i].downstream:
        if state[j] == 1:
            loop = [graph.nodes[k].path for k in trail[trail.index(j) :]] + [graph.nodes[j].path]
            raise DefinitionError(
                f"the pipeline has a cycle: {' -> '.join(loop)}; items may only flow "
                "forward, so remove one of these edges"
            )
        if state[j] == 0:
            _visit(graph, state, j, trail)
    trail.pop()
    state[i] = 2


def _check_reachable(graph: Graph) -> None:
    seen = set()
    todo = [n.index for n in graph.nodes if n.stage.kind == PRODUCER]
    if not todo:
        raise DefinitionError(
            f"pipeline {graph.root.pipeline.name!r} has no producer: add a stage with "
            "@producer that yields the items to process"
        )
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo.extend(graph.nodes[i].downstream)
    lost = [n.path for n in graph.nodes if n.index not in seen]
    if lost:
        raise DefinitionError(
            f"no producer reaches stage(s) {', '.join(map(repr, lost))}: connect them with "
            "to= or from_=, or remove them"
        )
