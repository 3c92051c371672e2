"""Tracing: run a program's Python body on a `TracerProgramState` that records IR nodes instead
of calling a model.

Arguments not given become `SglArgument` placeholders (putting one in an f-string raises a
`TypeError`: use `+`). A gen's result is an `SglVariable` pointing at the gen node, so a later
`s += s["x"]` records a data dependency. Each program state (the program's own, each fork branch,
each nested program) is one *stream*: its nodes are chained by `prev_node`. compiler.py turns the
streams into an explicit graph.
"""

from __future__ import annotations

import copy
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from plait.lang import ir
from plait.lang.backend.base import BaseBackend, as_backend


class StopTracing(Exception):
    """Raised inside a prefix-only trace at the first node that is not constant."""


_local = threading.local()


class TracingScope:
    """While active, calling another program traces it instead of running it."""

    def __init__(self, backend: BaseBackend):
        self.backend = backend
        self.states: list[TracerProgramState] = []

    @staticmethod
    def current() -> TracingScope | None:
        stack = getattr(_local, "stack", None)
        return stack[-1] if stack else None

    def __enter__(self) -> TracingScope:
        _local.__dict__.setdefault("stack", []).append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.stack.pop()
        outer = TracingScope.current()
        if outer is not None:
            outer.states.extend(self.states)


def constant_text(node: ir.SglExpr) -> str | None:
    """The text a node contributes in every run, or None if it depends on the run."""
    if isinstance(node, ir.SglConstantText):
        return node.value
    if isinstance(node, (ir.SglRoleBegin, ir.SglRoleEnd)):
        return node.rendered
    if isinstance(node, (ir.SglVarScopeBegin, ir.SglVarScopeEnd, ir.SglCommitLazy, ir.SglGetForkItem)):
        return ""
    return None


class TracerProgramState:
    """Mimics `ProgramState`, recording nodes. `nodes` is this stream in program order."""

    def __init__(self, backend: BaseBackend, arguments: dict[str, Any], *, only_trace_prefix: bool = False,
                 parent: TracerProgramState | None = None):
        self.pid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.only_trace_prefix = only_trace_prefix
        self.nodes: list[ir.SglExpr] = []
        self.last_node: ir.SglExpr | None = None
        self.variables: dict[Any, Any] = {}
        self.ret_value: Any = None
        self.chat_template = backend.get_chat_template()
        self.cur_role: str | None = None
        self.messages_: list[dict[str, str]] = []  # roles only: enough to render prefixes
        self.child_states: list[TracerProgramState] = []
        self.parent = parent
        self.scope_states: list[TracerProgramState] = []  # set on the root: every stream of the trace
        self._counter = 0
        scope = TracingScope.current()
        if scope is not None:
            scope.states.append(self)

    # ---- recording ----------------------------------------------------------------------------
    def _append_node(self, node: ir.SglExpr) -> ir.SglExpr:
        if self.only_trace_prefix and constant_text(node) is None:
            raise StopTracing()
        node = copy.copy(node)  # the same expr may be appended to several branches
        node.node_id = next(ir._node_ids)
        node.pid = self.pid
        node.prev_node = self.last_node
        self.last_node = node
        self.nodes.append(node)
        return node

    def _execute(self, expr: Any) -> None:
        expr = ir._as_expr(expr)
        if isinstance(expr, ir.SglExprList):
            for e in expr.expr_list:
                self._execute(e)
        elif isinstance(expr, (ir.SglGen, ir.SglSelect)):
            if expr.name is None:
                expr = copy.copy(expr)
                kind = "gen" if isinstance(expr, ir.SglGen) else "select"
                expr.name = f"{kind}_{self._counter}"
                self._counter += 1
            node = self._append_node(expr)
            self.variables[node.name] = ir.SglVariable(node.name, node)
        elif isinstance(expr, ir.SglRoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, ir.SglRoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, ir.SglSeparateReasoning):
            node = self._append_node(expr)
            self.variables[node.name] = ir.SglVariable(node.name, node)
            self.variables[node.gen_name] = ir.SglVariable(node.gen_name, node)
        elif isinstance(expr, ir.SglVarScopeEnd):
            node = self._append_node(expr)
            self.variables[node.name] = ir.SglVariable(node.name, node)
        else:
            self._append_node(expr)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError("Nested roles are not allowed.")
        template = self.chat_template
        if not self.messages_ and role != "system" and template.default_system_prompt is not None:
            self._role_begin("system")
            self._append_node(ir.SglConstantText(template.default_system_prompt))
            self._role_end("system")
        node = ir.SglRoleBegin(role)
        node.rendered = template.get_prefix_and_suffix(role, self.messages_)[0]
        self._append_node(node)
        self.cur_role = role

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"role end {role!r} does not match the open role {self.cur_role!r}")
        node = ir.SglRoleEnd(role)
        node.rendered = self.chat_template.get_prefix_and_suffix(role, self.messages_)[1]
        self._append_node(node)
        self.messages_.append({"role": role})
        self.cur_role = None

    # ---- the ProgramState surface -------------------------------------------------------------
    def __iadd__(self, other: Any) -> TracerProgramState:
        self._execute(other)
        return self

    def __getitem__(self, name: Any) -> Any:
        if name in self.variables:
            return self.variables[name]
        if name in self.arguments:
            return self.arguments[name]
        raise KeyError(f"variable {name!r} is not defined (while tracing)")

    def __setitem__(self, name: Any, value: Any) -> None:
        self.variables[name] = value

    def get_var(self, name: Any) -> Any:
        return self[name]

    def set_var(self, name: Any, value: Any) -> None:
        self[name] = value

    def __contains__(self, name: Any) -> bool:
        return name in self.variables

    def _role(self, role: str, expr: Any = None) -> Any:
        if expr is not None:
            self._execute(ir.SglExprList([ir.SglRoleBegin(role), expr, ir.SglRoleEnd(role)]))
            return None
        return self._role_block(role)

    @contextmanager
    def _role_block(self, role: str) -> Iterator[None]:
        self._role_begin(role)
        yield
        self._role_end(role)

    def system(self, expr: Any = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        self._execute(ir.SglVarScopeBegin(name))
        yield
        self._execute(ir.SglVarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> TracerProgramStateGroup:
        fork_node = self._append_node(ir.SglFork(size, position_ids_offset))
        children = []
        for i in range(size):
            child = TracerProgramState(self.backend, self.arguments, only_trace_prefix=self.only_trace_prefix,
                                       parent=self)
            item = ir.SglGetForkItem(i)
            item.prev_node = fork_node
            item.pid = child.pid
            child.last_node = item
            child.nodes.append(item)
            child.variables = dict(self.variables)
            child.cur_role = self.cur_role
            child.messages_ = list(self.messages_)
            children.append(child)
        self.child_states.extend(children)
        return TracerProgramStateGroup(children, self)

    @contextmanager
    def copy(self, position_ids_offset: Any = None) -> Iterator[TracerProgramState]:
        group = self.fork(1, position_ids_offset)
        yield group[0]
        group.join()

    def _not_while_tracing(self, what: str) -> Any:
        raise TypeError(f"{what} is not available while tracing (no model runs)")

    def text(self) -> str:
        return self._not_while_tracing("text()")

    def messages(self) -> list:
        return self._not_while_tracing("messages()")

    def get_meta_info(self, name: Any, timeout: float | None = None) -> Any:
        return self._not_while_tracing("get_meta_info()")

    def sync(self) -> None:
        pass

    def error(self) -> None:
        return None


class TracerProgramStateGroup:
    def __init__(self, states: list[TracerProgramState], src_state: TracerProgramState):
        self.states = states
        self.src_state = src_state

    def __getitem__(self, i: int) -> TracerProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: Any) -> None:
        pass

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[TracerProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> TracerProgramStateGroup:
        if callable(other) and not isinstance(other, ir.SglExpr):
            for i, s in enumerate(self.states):
                s += other(i)
        elif isinstance(other, (list, tuple)):
            for s, item in zip(self.states, other, strict=True):
                s += item
        else:
            for s in self.states:
                s += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        if mode == "gather_variable":
            before = self.src_state.variables
            names = list(dict.fromkeys(n for c in self.states for n in c.variables
                                       if c.variables[n] is not before.get(n)))
            for name in names:
                self.src_state.variables[name] = [c.variables.get(name) for c in self.states]
        elif mode == "concate_and_append":
            self.src_state._execute(ir.SglConcateAndAppend(self.states))
        else:
            raise ValueError(f"invalid join mode {mode!r}")


def _arguments(program: Any, given: dict[str, Any]) -> dict[str, Any]:
    """Given and bound arguments are constants of the trace; the rest are placeholders."""
    args: dict[str, Any] = {name: ir.SglArgument(name, program.arg_defaults.get(name)) for name in program.arg_names}
    args.update(program.bind_arguments)
    args.update(given)
    return args


def trace_program(program: Any, arguments: dict[str, Any], backend: Any = None, *,
                  only_trace_prefix: bool = False) -> TracerProgramState:
    """Trace `program`; every state created on the way is in `state.scope_states`."""
    backend = as_backend(backend) if backend is not None else BaseBackend()
    args = _arguments(program, arguments)
    with TracingScope(backend) as scope:
        state = TracerProgramState(backend, args, only_trace_prefix=only_trace_prefix)
        try:
            state.ret_value = program.func(state, **args)
        finally:
            state.scope_states = list(scope.states)
    return state


def extract_prefix_by_tracing(program: Any, backend: Any = None) -> str:
    """The text every run of `program` starts with (the leading constant nodes)."""
    backend = as_backend(backend) if backend is not None else BaseBackend()
    with TracingScope(backend) as scope:
        state = TracerProgramState(backend, _arguments(program, {}), only_trace_prefix=True)
        try:
            program.func(state, **state.arguments)
        except (StopTracing, TypeError, AttributeError, KeyError, ValueError, IndexError):
            pass  # the prefix recorded so far is still valid
        scope.states.clear()
    prefix = []
    for node in state.nodes:
        text = constant_text(node)
        if text is None:
            break
        prefix.append(text)
    return "".join(prefix)
