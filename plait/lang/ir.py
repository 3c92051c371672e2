"""The intermediate representation: what `s += ...` appends and what the tracer records.

Every primitive (`gen`, `select`, roles, images, ...) builds one of these nodes; the interpreter
executes them in order on a program state, and the tracer links them into a graph
(`prev_node` = the node before it in the same stream; `SglVariable.source` = a data dependency).
`expr + expr` builds a flat `SglExprList`.
"""

from __future__ import annotations

import itertools
from typing import Any

from plait.lang.params import (  # noqa: F401  (re-exported: SGLang users import them from here)
    DTYPE_REGEX,
    REGEX_BOOL,
    REGEX_FLOAT,
    REGEX_INT,
    REGEX_STR,
    REGEX_STRING,
    GenOverrides,
)

_node_ids = itertools.count()


class SglExpr:
    """Base of all IR nodes."""

    def __init__(self) -> None:
        self.node_id = next(_node_ids)
        self.prev_node: SglExpr | None = None
        self.pid: str | None = None  # the traced stream (program state) the node belongs to

    def __add__(self, other: Any) -> SglExprList:
        return SglExprList([self, _as_expr(other)])

    def __radd__(self, other: Any) -> SglExprList:
        return SglExprList([_as_expr(other), self])

    def concatenate_ir(self, a: SglExpr, b: SglExpr) -> SglExprList:
        return SglExprList([a, b])

    def dependencies(self) -> list[SglExpr]:
        """Nodes whose *output* this node reads (besides its stream predecessor)."""
        return []

    def print_graph_dfs(self) -> str:
        """All nodes reachable from this one, oldest first, as `%7 = %6 + Gen('answer')` lines."""
        seen: dict[int, SglExpr] = {}
        stack: list[SglExpr] = [self]
        while stack:
            node = stack.pop()
            if node.node_id in seen:
                continue
            seen[node.node_id] = node
            stack.extend(n for n in [node.prev_node, *node.dependencies()] if n is not None)
        lines = []
        for node_id in sorted(seen):
            node = seen[node_id]
            prev = f"%{node.prev_node.node_id} + " if node.prev_node is not None else ""
            lines.append(f"%{node_id} = {prev}{node!r}")
        return "\n".join(lines)


def _as_expr(x: Any) -> SglExpr:
    if isinstance(x, SglExpr):
        return x
    if isinstance(x, str):
        return SglConstantText(x)
    if x is None:
        raise ValueError("cannot append None to a program")
    raise TypeError(f"cannot append a {type(x).__name__} to a program; use str(...) or a primitive")


class SglExprList(SglExpr):
    """A concatenation; nested lists are flattened, so `a + b + c` is one list of three."""

    def __init__(self, expr_list: list[Any]):
        super().__init__()
        flat: list[SglExpr] = []
        for e in expr_list:
            e = _as_expr(e)
            flat.extend(e.expr_list if isinstance(e, SglExprList) else [e])
        self.expr_list = flat

    def __add__(self, other: Any) -> SglExprList:
        return SglExprList([*self.expr_list, _as_expr(other)])

    def __radd__(self, other: Any) -> SglExprList:
        return SglExprList([_as_expr(other), *self.expr_list])

    def __repr__(self) -> str:
        return f"ExprList({self.expr_list})"


class SglArgument(SglExpr):
    """A function argument while tracing: a placeholder whose value is unknown (None) or given."""

    def __init__(self, name: str, value: Any = None):
        super().__init__()
        self.name = name
        self.value = value

    def __repr__(self) -> str:
        return f"Argument(name={self.name!r})"

    def __format__(self, spec: str) -> str:
        raise TypeError(
            f"Cannot put argument {self.name!r} inside a f-string: while tracing it is a placeholder. "
            "Use `+` instead, e.g. `s += 'Q: ' + question`."
        )

    def _known(self) -> Any:
        if self.value is None:
            raise TypeError(f"argument {self.name!r} is a placeholder while tracing; its value is unknown")
        return self.value

    def __len__(self) -> int:
        return len(self._known())

    def __getitem__(self, i: Any) -> Any:
        return self._known()[i]

    def __int__(self) -> int:
        return int(self._known())

    def __index__(self) -> int:
        return int(self._known())

    def __iter__(self) -> Any:
        return iter(self._known())

    def __bool__(self) -> bool:
        return bool(self._known())


class SglConstantText(SglExpr):
    def __init__(self, value: str):
        super().__init__()
        self.value = value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


class SglGen(SglExpr):
    """Generate text into variable `name`. `overrides` holds only what this gen sets."""

    def __init__(self, name: str | None = None, overrides: GenOverrides | None = None, **params: Any):
        super().__init__()
        self.name = name
        self.overrides = overrides if overrides is not None else GenOverrides.from_kwargs(params)

    @property
    def sampling_params(self) -> GenOverrides:
        return self.overrides

    def __repr__(self) -> str:
        return f"Gen({self.name!r})"


class SglSelect(SglExpr):
    """Choose one of `choices` by scoring each with the backend."""

    def __init__(self, name: str | None, choices: list[str], temperature: float, choices_method: Any):
        super().__init__()
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("select needs a non-empty list of strings as choices")
        self.name = name
        self.choices = list(choices)
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        return f"Select({self.name!r}, choices={self.choices})"


class SglImage(SglExpr):
    def __init__(self, path: Any):
        super().__init__()
        self.path = path

    def __repr__(self) -> str:
        return f"Image({str(self.path)[:40]!r})"


class SglVideo(SglExpr):
    def __init__(self, path: Any, num_frames: int):
        super().__init__()
        self.path = path
        self.num_frames = num_frames

    def __repr__(self) -> str:
        return f"Video({str(self.path)[:40]!r}, num_frames={self.num_frames})"


class SglRoleBegin(SglExpr):
    def __init__(self, role: str):
        super().__init__()
        self.role = role
        self.rendered: str | None = None  # the template prefix, filled in by the tracer

    def __repr__(self) -> str:
        return f"RoleBegin({self.role})"


class SglRoleEnd(SglExpr):
    def __init__(self, role: str):
        super().__init__()
        self.role = role
        self.rendered: str | None = None  # the template suffix, filled in by the tracer

    def __repr__(self) -> str:
        return f"RoleEnd({self.role})"


class SglFork(SglExpr):
    def __init__(self, number: int, position_ids_offset: Any = None):
        super().__init__()
        self.number = number
        self.position_ids_offset = position_ids_offset

    def __repr__(self) -> str:
        return f"Fork({self.number})"


class SglGetForkItem(SglExpr):
    """The start of fork branch `index`; its `prev_node` is the `SglFork`."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def __repr__(self) -> str:
        return f"GetForkItem({self.index})"


class SglVariable(SglExpr):
    """A reference to the value another node produces (`s["x"]` while tracing)."""

    def __init__(self, name: str, source: SglExpr | None):
        super().__init__()
        self.name = name
        self.source = source
        self.source_stream_executor: Any = None  # set when a compiled program binds it

    def dependencies(self) -> list[SglExpr]:
        return [self.source] if self.source is not None else []

    def __bool__(self) -> bool:
        raise TypeError(f"cannot branch on generated variable {self.name!r} while tracing: its value is unknown")

    def __format__(self, spec: str) -> str:
        raise TypeError(f"Cannot put variable {self.name!r} inside a f-string while tracing. Use `+` instead.")

    def __repr__(self) -> str:
        return f"Variable({self.name!r}, source=%{self.source.node_id if self.source else None})"


class SglVarScopeBegin(SglExpr):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __repr__(self) -> str:
        return f"VarScopeBegin({self.name!r})"


class SglVarScopeEnd(SglExpr):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __repr__(self) -> str:
        return f"VarScopeEnd({self.name!r})"


class SglConcateAndAppend(SglExpr):
    """Append every fork branch's post-fork text to the parent (join mode `concate_and_append`)."""

    def __init__(self, states: list[Any]):
        super().__init__()
        self.states = states

    def __repr__(self) -> str:
        return f"ConcateAndAppend({len(self.states)})"


class SglCommitLazy(SglExpr):
    """Make the backend prefill the transcript so far (the fork hint)."""

    def __repr__(self) -> str:
        return "CommitLazy()"


class SglSeparateReasoning(SglExpr):
    """Split the preceding gen's text into `<name>_reasoning_content` and the answer."""

    def __init__(self, model_type: str, expr: SglExpr):
        super().__init__()
        self.model_type = model_type
        self.expr = expr
        self.name = self.process_name_for_reasoning(expr)

    @staticmethod
    def process_name_for_reasoning(expr: SglExpr) -> str:
        name = None
        for e in expr.expr_list if isinstance(expr, SglExprList) else [expr]:
            if isinstance(e, (SglGen, SglSelect)):
                name = e.name
        if not name:
            raise ValueError(f"separate_reasoning needs a named gen or select, got {expr!r}")
        return name + "_reasoning_content"

    @property
    def gen_name(self) -> str:
        return self.name[: -len("_reasoning_content")]

    def __repr__(self) -> str:
        return f"SeparateReasoning(model_type={self.model_type}, name={self.name})"

