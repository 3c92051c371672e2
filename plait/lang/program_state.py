"""`ProgramState`, the `s` a program sees, and `ProgramStateGroup`, the result of `s.fork(n)`.

Both are thin: every operation becomes an expression queued on the state's `StreamExecutor`
(see interpreter.py), or a wait on it.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

from plait.lang import ir

if TYPE_CHECKING:
    from plait.lang.interpreter import StreamExecutor


class SetVar(ir.SglExpr):
    """`s["x"] = v`, queued so it lands in order with the gens around it."""

    def __init__(self, name: Any, value: Any):
        super().__init__()
        self.name = name
        self.value = value

    def __repr__(self) -> str:
        return f"SetVar({self.name!r})"


class ProgramState:
    """The state of one running program: append with `+=`, read with `s["x"]`."""

    def __init__(self, stream_executor: StreamExecutor):
        self.stream_executor = stream_executor
        self.ret_value: Any = None

    # ---- building -----------------------------------------------------------------------------
    def __iadd__(self, other: Any) -> ProgramState:
        self.stream_executor.submit(ir._as_expr(other))
        return self

    def _role(self, role: str, expr: Any = None) -> Any:
        if expr is not None:
            self.stream_executor.submit(ir.SglExprList([ir.SglRoleBegin(role), expr, ir.SglRoleEnd(role)]))
            return None
        return self._role_block(role)

    @contextmanager
    def _role_block(self, role: str) -> Iterator[None]:
        self.stream_executor.submit(ir.SglRoleBegin(role))
        yield
        self.stream_executor.submit(ir.SglRoleEnd(role))

    def system(self, expr: Any = None) -> Any:
        """`s.system("...")` appends a system turn; `with s.system():` brackets appends."""
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """Everything appended inside the block becomes variable `name`."""
        self.stream_executor.submit(ir.SglVarScopeBegin(name))
        yield
        self.stream_executor.submit(ir.SglVarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> ProgramStateGroup:
        children = self.stream_executor.fork(size, position_ids_offset)
        return ProgramStateGroup([ProgramState(c) for c in children], self)

    @contextmanager
    def copy(self, position_ids_offset: Any = None) -> Iterator[ProgramState]:
        group = self.fork(1, position_ids_offset)
        try:
            yield group[0]
        finally:
            group.join()

    # ---- reading ------------------------------------------------------------------------------
    def __getitem__(self, name: Any) -> Any:
        return self.stream_executor.get_var(name)

    def __setitem__(self, name: Any, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def __contains__(self, name: Any) -> bool:
        return self.stream_executor.has_var(name)

    def get_var(self, name: Any) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: Any, value: Any) -> None:
        self[name] = value

    def get_meta_info(self, name: Any, timeout: float | None = None) -> Any:
        return self.stream_executor.get_meta_info(name, timeout)

    def text(self) -> str:
        return self.stream_executor.text()

    def messages(self) -> list[dict[str, Any]]:
        return self.stream_executor.messages()

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        return self.stream_executor.error_

    def end(self) -> None:
        self.stream_executor.end()

    # ---- streaming ----------------------------------------------------------------------------
    def text_iter(self, var_name: Any = None) -> Iterator[str]:
        """Yield text as it arrives: the whole transcript, or only variable `var_name`.
        A non-streaming state yields its final text once."""
        ex = self.stream_executor
        if not ex.stream:
            yield self.text() if var_name is None else str(self.get_var(var_name))
            return
        if var_name is None:
            yield from self._follow(lambda: ex.text_, lambda: ex.is_finished)
            return
        ex.wait_for(lambda: var_name in ex.variables or ex.is_finished or ex.error_ is not None)
        if var_name not in ex.variables:
            ex.raise_if_failed()
            return
        yield from self._follow(lambda: ex.variables[var_name],
                                lambda: ex._pending[var_name] == 0 or ex.is_finished)

    def _follow(self, current: Callable[[], str], done: Callable[[], bool]) -> Iterator[str]:
        ex = self.stream_executor
        pos = 0
        while True:
            ex.wait_for(lambda seen=pos: len(current()) > seen or done() or ex.error_ is not None)
            with ex._cv:
                text, finished = current(), done()
            if len(text) > pos:
                yield text[pos:]
                pos = len(text)
            ex.raise_if_failed()
            if finished and len(text) == pos:
                return

    async def text_async_iter(self, var_name: Any = None, return_meta_data: bool = False) -> AsyncIterator[Any]:
        """`text_iter` for asyncio; with `return_meta_data`, yields `(chunk, meta_info)` pairs."""
        loop = asyncio.get_running_loop()
        it = self.text_iter(var_name)
        end = object()
        while True:
            chunk = await loop.run_in_executor(None, next, it, end)
            if chunk is end:
                return
            if return_meta_data:
                yield chunk, dict(self.stream_executor.meta_info.get(var_name) or {})
            else:
                yield chunk

    def __repr__(self) -> str:
        self.stream_executor.sync()
        return f"ProgramState({self.stream_executor.text_!r})"

    def __del__(self) -> None:
        # Only this state: its branches may still be in use (a tree search keeps the leaves and drops
        # the levels above them); they end when dropped themselves, joined, or when the program returns.
        try:
            self.stream_executor.end(cascade=False)
        except Exception:
            pass


class ProgramStateGroup:
    """The branches of a fork. `forks += expr` appends to every branch."""

    def __init__(self, states: list[ProgramState], src_state: ProgramState):
        self.states = states
        self.src_state = src_state

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        if value is not self.states[i]:
            raise ValueError("a fork branch can only be updated in place (forks[i] += ...)")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ProgramStateGroup:
        """A callable gets the branch index; a list gives one item per branch; an expr or str goes to all."""
        if isinstance(other, str):
            other = ir.SglConstantText(other)
        if callable(other) and not isinstance(other, ir.SglExpr):
            for i, s in enumerate(self.states):
                s += other(i)
        elif isinstance(other, ir.SglExpr):
            for s in self.states:
                s += other
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} items for {len(self.states)} branches")
            for s, item in zip(self.states, other):
                s += item
        else:
            raise TypeError(f"cannot append a {type(other).__name__} to fork branches")
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """gather_variable: each variable the branches defined after the fork becomes a list on the
        parent (waits for the branches). concate_and_append: the branches' texts are appended to
        the parent in order (queued like any append)."""
        children = [s.stream_executor for s in self.states]
        if mode == "gather_variable":
            for child in children:
                child.sync()
                child.raise_if_failed()
            names = list(dict.fromkeys(n for c in children for n in c.defined_here if n is not None))
            for name in names:
                self.src_state[name] = [c.variables.get(name) for c in children]
            for child in children:
                child.end()
        elif mode == "concate_and_append":
            self.src_state += ir.SglConcateAndAppend(children)
        else:
            raise ValueError(f"invalid join mode {mode!r}: use 'gather_variable' or 'concate_and_append'")
