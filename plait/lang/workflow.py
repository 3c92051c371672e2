"""Agent-workflow hints, filled in by the interpreter so the runtime's cache can plan for them.

A program that runs other programs is a workflow, and each program it runs is an agent: while a
program's body executes, it is the *workflow scope*, and every program started inside it (on the
same thread) sends its requests with `workflow_id` (the scope's id) and `agent` (the program's
name). The server learns the step graph from the order in which agents run and evicts and
prefetches cached prefixes by it. `workflow()` opens a scope explicitly, for a loop of programs
driven from plain Python.

    @plait.function
    def team(s, task):
        plan = planner.run(task=task)            # agent "planner" of workflow <team's run>
        for _ in range(3):
            code = coder.run(plan=plan["plan"])  # agent "coder"
            review = reviewer.run(code=code["code"])

    with plait.workflow():                       # the same from a plain loop
        for task in tasks:
            planner.run(task=task)
            coder.run(...)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_SCOPE: ContextVar[str | None] = ContextVar("plait_workflow_scope", default=None)


@contextmanager
def workflow(workflow_id: str | None = None) -> Iterator[str]:
    """Programs run inside the block are agents of one workflow (a fresh id unless given)."""
    token = _SCOPE.set(workflow_id or uuid.uuid4().hex)
    try:
        yield _SCOPE.get()
    finally:
        _SCOPE.reset(token)


def current_workflow() -> str | None:
    """The id of the workflow scope this thread is in, or None."""
    return _SCOPE.get()


@contextmanager
def body_scope(workflow_id: str) -> Iterator[None]:
    """While a program's body runs, programs it starts are agents of `workflow_id`."""
    token = _SCOPE.set(workflow_id)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def hint_fields(hint: tuple[str, str] | None) -> dict[str, str]:
    """The request fields for an executor's `(workflow_id, agent)` hint."""
    return {} if hint is None else {"workflow_id": hint[0], "agent": hint[1]}
