"""The program graph a trace describes, and `CompiledFunction`, which uses it to prefetch.

## The graph (`ProgramGraph`)
- A **node** is one IR expression (ir.py) recorded by the tracer, keyed by its `node_id`.
- A **stream** is one program state: 0 is the program's own, then fork branches and nested
  programs in creation order. `streams[k]` lists stream k's nodes in program order; a branch's
  first node is an `SglGetForkItem` whose `prev` is the `SglFork` node in the parent stream
  (`parent[k] = (parent_stream, fork_node_id)`).
- Edges: `prev` (the node before, same stream, or the fork for a branch's first node) and
  `sources` (data dependencies: the gen/select/var-scope an `SglVariable` reads, the last nodes of
  the branches a `concate_and_append` join appends). `order` is a topological order of both.
- **Constant text**: a node's text is constant when it is the same in every run
  (`tracer.constant_text`: literal text, rendered role prefixes/suffixes). `constant_prefix(k)`
  is the text every run of stream k starts with; a branch inherits its parent's text up to the
  fork only when all of it is constant.
- `shared_prefixes()` = those prefixes, the longest per stream, deduplicated (a prefix of another
  is dropped: caching the longer one caches it). Every run of the program reuses them, which is
  what prefetching, and later workflow-aware cache eviction, want to know.

Running a compiled program re-runs its Python body in the interpreter (so control flow that
depends on generated text still works); the graph only decides what to prefetch.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from plait.lang import ir
from plait.lang.backend.base import BaseBackend, as_backend
from plait.lang.global_config import global_config
from plait.lang.tracer import TracerProgramState, constant_text, trace_program


@dataclass
class GraphNode:
    node_id: int
    stream: int
    expr: ir.SglExpr
    prev: int | None = None
    sources: list[int] = field(default_factory=list)
    next: list[int] = field(default_factory=list)


@dataclass
class ProgramGraph:
    nodes: dict[int, GraphNode]
    streams: dict[int, list[int]]
    parent: dict[int, tuple[int, int]]
    order: list[int]

    @classmethod
    def from_trace(cls, root: TracerProgramState) -> ProgramGraph:
        states = [root] + [s for s in root.scope_states if s is not root]
        stream_of = {s.pid: i for i, s in enumerate(states)}
        nodes: dict[int, GraphNode] = {}
        streams: dict[int, list[int]] = {}
        parent: dict[int, tuple[int, int]] = {}
        for k, state in enumerate(states):
            streams[k] = [n.node_id for n in state.nodes]
            for node in state.nodes:
                nodes[node.node_id] = GraphNode(node.node_id, k, node,
                                                node.prev_node.node_id if node.prev_node is not None else None)
            if state.parent is not None and state.nodes:
                parent[k] = (stream_of[state.parent.pid], state.nodes[0].prev_node.node_id)
        for gn in nodes.values():
            deps = gn.expr.dependencies()
            if isinstance(gn.expr, ir.SglConcateAndAppend):
                deps = [s.last_node for s in gn.expr.states]
            gn.sources = [d.node_id for d in deps if d is not None and d.node_id in nodes]
            for src in ([gn.prev] if gn.prev is not None else []) + gn.sources:
                if src in nodes:
                    nodes[src].next.append(gn.node_id)
        return cls(nodes, streams, parent, _topological_order(nodes))

    def _leading_constant(self, stream: int, upto: int | None = None) -> tuple[str, bool]:
        """Constant text at the start of `stream` (before node `upto`), and whether all of it was constant."""
        if stream in self.parent:
            parent_stream, fork_id = self.parent[stream]
            text, complete = self._leading_constant(parent_stream, upto=fork_id)
            if not complete:
                return text, False
        else:
            text = ""
        for node_id in self.streams[stream]:
            if node_id == upto:
                return text, True
            piece = constant_text(self.nodes[node_id].expr)
            if piece is None:
                return text, False
            text += piece
        return text, True

    def constant_prefix(self, stream: int = 0) -> str:
        return self._leading_constant(stream)[0]

    def shared_prefixes(self, min_chars: int | None = None) -> list[str]:
        min_chars = global_config.precache_min_chars if min_chars is None else min_chars
        found = {self.constant_prefix(k) for k in self.streams}
        found = {p for p in found if len(p) >= min_chars}
        return sorted(p for p in found if not any(q != p and q.startswith(p) for q in found))

    def format(self) -> str:
        lines = []
        for node_id in self.order:
            gn = self.nodes[node_id]
            prev = f"%{gn.prev} + " if gn.prev is not None else ""
            reads = f"   [reads {', '.join(f'%{s}' for s in gn.sources)}]" if gn.sources else ""
            lines.append(f"stream {gn.stream}: %{node_id} = {prev}{gn.expr!r}{reads}")
        return "\n".join(lines)


def _topological_order(nodes: dict[int, GraphNode]) -> list[int]:
    """Kahn's algorithm; ties broken by node id (= program order within a stream)."""
    indegree = {k: 0 for k in nodes}
    for gn in nodes.values():
        for nxt in gn.next:
            indegree[nxt] += 1
    ready = collections.deque(sorted(k for k, d in indegree.items() if d == 0))
    order = []
    while ready:
        k = ready.popleft()
        order.append(k)
        for nxt in sorted(nodes[k].next):
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    assert len(order) == len(nodes), "the program graph has a cycle"
    return order


class CompiledFunction:
    """A traced program: `run`/`run_batch` first prefetch the prefixes every run shares."""

    def __init__(self, function: Any, tracer_state: TracerProgramState, backend: BaseBackend):
        self.function = function
        self.tracer_state = tracer_state
        self.backend = backend
        self.graph = ProgramGraph.from_trace(tracer_state)

    def print_graph(self) -> str:
        text = self.graph.format()
        print(text)
        return text

    def shared_prefixes(self) -> list[str]:
        return self.graph.shared_prefixes()

    def prefetch(self, backend: Any = None) -> list[str]:
        """Send every shared prefix to the backend's prefix cache; returns what was sent."""
        backend = self._backend(backend)
        prefixes = self.shared_prefixes()
        for prefix in prefixes:
            backend.cache_prefix(prefix)
        return prefixes

    def run(self, *args: Any, backend: Any = None, **kwargs: Any) -> Any:
        backend = self._backend(backend)
        self.prefetch(backend)
        return self.function.run(*args, backend=backend, **kwargs)

    def run_batch(self, batch_kwargs: list[Any], *, backend: Any = None, **kwargs: Any) -> Any:
        backend = self._backend(backend)
        self.prefetch(backend)
        return self.function.run_batch(batch_kwargs, backend=backend, precache=False, **kwargs)

    def _backend(self, backend: Any) -> BaseBackend:
        if backend is not None:
            return as_backend(backend)
        if global_config.default_backend is not None and type(self.backend) is BaseBackend:
            return as_backend(global_config.default_backend)
        return self.backend


def compile_func(function: Any, backend: Any = None) -> CompiledFunction:
    if backend is None:
        backend = global_config.default_backend
    backend = as_backend(backend) if backend is not None else BaseBackend()
    return CompiledFunction(function, trace_program(function, {}, backend), backend)
