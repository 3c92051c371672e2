"""What a workload module provides: its program, its shapes, its synthetic arguments, and the
structure each program claims (calls, forks, selects), which the tests check on a scripted backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

SIZES = ("quick", "cpu", "paper")


class Structure(NamedTuple):
    """What one program does, in frontend calls (a fork of n counts once in `forks`, n in `branches`)."""

    gens: int
    selects: int = 0
    forks: int = 0
    branches: int = 0


@dataclass(frozen=True)
class Workload:
    name: str
    title: str  # how tables and plots name it
    program: Any  # the SglFunction run once per item
    shapes: dict[str, Any]  # size name -> the module's frozen Shape
    make_args: Callable[[Any, int], list[dict[str, Any]]]  # (shape, seed) -> one argument dict per program
    structure: Callable[[Any, dict[str, Any]], Structure]  # (shape, arguments) -> what that program does
    # For workloads whose output has a checkable form: does this finished program's output pass?
    validate: Callable[[Any], bool] | None = None

    def shape(self, size: str) -> Any:
        if size not in self.shapes:
            raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
        return self.shapes[size]


def latency_args(workload: Workload, shape: Any, seed: int) -> list[dict[str, Any]]:
    """The programs of a latency run: the first `shape.latency_programs` of another seed's batch."""
    return workload.make_args(shape, seed)[: shape.latency_programs]
