"""The ablations of the paper's Fig. 8c, each one switch: a runtime option (a fresh engine with it,
or a server started with its `launch_flags`) or a frontend setting (`global_config`, restored
afterwards)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from plait.lang.backend.runtime import server_flags
from plait.lang.global_config import global_config


@dataclass(frozen=True)
class Ablation:
    name: str
    removes: str  # what it takes away, for the table
    engine: dict[str, Any] = field(default_factory=dict)  # runtime options
    frontend: dict[str, Any] = field(default_factory=dict)  # global_config attributes
    workloads: tuple[str, ...] | None = None  # where it can matter (None: everywhere)

    @property
    def launch_flags(self) -> str:
        """The server flags that set a runtime ablation (`plait serve ... --disable-radix-cache`)."""
        return " ".join(server_flags(self.engine))


ABLATIONS = {a.name: a for a in (
    Ablation("full", "nothing"),
    Ablation("no-cache", "the prefix cache", engine={"disable_radix_cache": True}),
    Ablation("flat-cache", "the tree (an exact-prefix table instead)", engine={"prefix_cache": "flat"}),
    Ablation("fcfs", "cache-aware scheduling (arrival order)", engine={"schedule_policy": "fcfs"}),
    Ablation("random", "cache-aware scheduling (random order)", engine={"schedule_policy": "random"}),
    Ablation("no-parallelism", "frontend parallelism (a program's calls run one at a time)",
             frontend={"enable_parallel_execution": False}),
    Ablation("no-hints", "frontend hints (no prefix sent before forks and batches)",
             frontend={"enable_fork_hint": False, "enable_precache_with_tracing": False}),
    Ablation("no-jump-forward", "jump-forward (the compressed FSM)", engine={"disable_jump_forward": True},
             workloads=("json_decode",)),
)}


def parse_ablations(spec: str) -> list[Ablation]:
    """`all`, `none` (just `full`), or a comma-separated list; `full` always runs first."""
    if spec == "all":
        return list(ABLATIONS.values())
    names = [n.strip() for n in spec.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
    return [ABLATIONS["full"]] + [ABLATIONS[n] for n in names if n != "full"]


@contextlib.contextmanager
def frontend_settings(ablation: Ablation) -> Iterator[None]:
    saved = {name: getattr(global_config, name) for name in ablation.frontend}
    for name, value in ablation.frontend.items():
        setattr(global_config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(global_config, name, value)
