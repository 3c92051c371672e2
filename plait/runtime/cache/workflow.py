"""Agent workflows: step graphs and each agent's steps-to-execution (KVFlow's idea).

A workflow runs agents (each a fixed prompt: system prompt, tools, memory) in steps; a step graph
says which agents run at each step and which steps may follow. Requests name their workflow and
agent. The tracker keeps, per workflow, the step running now, and answers "how many steps until
this agent runs again" by a breadth-first walk from the current step over the graph (cycles are
fine: each step is visited once). The agents of the current step are at 0 until the workflow moves
on (a later agent's request arrives); then they get the distance to their next run.

A workflow without a published graph uses the graph learned from what was seen: one step per agent,
and an edge from each agent to every agent that ran right after it in some workflow. Programs with
the same structure thus teach each other their graph, which is how the frontend's hints suffice.

Cache nodes carry tags `(workflow_id, agent)`; a node's steps-to-execution is the minimum over its
tags (a prefix shared by several agents is needed as soon as the first of them runs). Untagged
nodes and agents no step reaches get `inf`: nothing is known to need them, so they go first.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

INF = math.inf
MAX_WORKFLOWS = 4096  # least recently active workflows beyond this are forgotten


@dataclass(frozen=True)
class Step:
    id: str
    agents: tuple[str, ...]
    next: tuple[str, ...] = ()


class StepGraph:
    def __init__(self, steps: Sequence[Step]):
        self.steps = {s.id: s for s in steps}
        if len(self.steps) != len(steps):
            raise ValueError("step ids must be unique")
        for s in steps:
            for n in s.next:
                if n not in self.steps:
                    raise ValueError(f"step {s.id!r} is followed by {n!r}, which is not a step of the graph")

    @classmethod
    def from_dicts(cls, steps: Sequence[dict]) -> StepGraph:
        return cls([Step(str(s["id"]), tuple(s.get("agents") or ()), tuple(s.get("next") or ())) for s in steps])

    def distances(self, current: Iterable[str]) -> dict[str, int]:
        """Agent -> steps until it next runs: 0 for the agents of the current steps (running, or about
        to), else the walk's distance to the nearest following step that has it."""
        dist: dict[str, int] = {a: 0 for c in current if c in self.steps for a in self.steps[c].agents}
        frontier = deque((n, 1) for c in current if c in self.steps for n in self.steps[c].next)
        seen: set[str] = set()
        while frontier:
            step_id, d = frontier.popleft()
            if step_id in seen:
                continue
            seen.add(step_id)
            for agent in self.steps[step_id].agents:
                dist.setdefault(agent, d)
            frontier.extend((n, d + 1) for n in self.steps[step_id].next)
        return dist

    def step_for(self, agent: str, current: frozenset[str]) -> str | None:
        """The step an arriving request of `agent` is in: a current step that has it, else the
        nearest following step that has it, else any step that has it."""
        for c in current:
            if c in self.steps and agent in self.steps[c].agents:
                return c
        frontier = deque(n for c in current if c in self.steps for n in self.steps[c].next)
        seen: set[str] = set()
        while frontier:
            step_id = frontier.popleft()
            if step_id in seen:
                continue
            seen.add(step_id)
            if agent in self.steps[step_id].agents:
                return step_id
            frontier.extend(self.steps[step_id].next)
        return next((s.id for s in self.steps.values() if agent in s.agents), None)


@dataclass
class _Workflow:
    graph: StepGraph | None = None  # published; None: the learned graph
    current: frozenset[str] = frozenset()
    last_agent: str | None = None
    agent_nodes: dict[str, object] = field(default_factory=dict)  # agent -> deepest cache node of its last run


class WorkflowTracker:
    def __init__(self, max_workflows: int = MAX_WORKFLOWS):
        self.max_workflows = max_workflows
        self._workflows: OrderedDict[str, _Workflow] = OrderedDict()
        self._learned: dict[str, set[str]] = {}  # agent -> agents seen running right after it
        self._learned_graph: StepGraph | None = None
        self._latest_nodes: dict[str, object] = {}  # agent -> its last run's node, any workflow
        self._distances: dict[str, dict[str, int]] = {}  # workflow -> agent -> steps (memo)
        self.version = 0  # bumped on every change that can change a distance

    def __len__(self) -> int:
        return len(self._workflows)

    def _get(self, workflow_id: str) -> _Workflow:
        wf = self._workflows.get(workflow_id)
        if wf is None:
            wf = self._workflows[workflow_id] = _Workflow()
            while len(self._workflows) > self.max_workflows:
                old, _ = self._workflows.popitem(last=False)
                self._distances.pop(old, None)
        else:
            self._workflows.move_to_end(workflow_id)
        return wf

    def _changed(self, workflow_id: str | None = None) -> None:
        self.version += 1
        if workflow_id is None:
            self._distances.clear()
        else:
            self._distances.pop(workflow_id, None)

    def publish(self, workflow_id: str, steps: StepGraph, current_step: str | None = None) -> None:
        """Set (or replace) a workflow's step graph, and optionally its current step."""
        if current_step is not None and current_step not in steps.steps:
            raise ValueError(f"current_step {current_step!r} is not a step of the graph")
        wf = self._get(workflow_id)
        wf.graph = steps
        if current_step is not None:
            wf.current = frozenset([current_step])
        self._changed(workflow_id)

    def graph_of(self, wf: _Workflow) -> StepGraph:
        if wf.graph is not None:
            return wf.graph
        if self._learned_graph is None:
            agents = set(self._learned) | {a for after in self._learned.values() for a in after}
            self._learned_graph = StepGraph([Step(a, (a,), tuple(sorted(self._learned.get(a, ())))) for a in sorted(agents)])
        return self._learned_graph

    def on_agent(self, workflow_id: str, agent: str) -> None:
        """A request of `agent` arrived in `workflow_id`: the workflow is now at that agent's step."""
        wf = self._get(workflow_id)
        if wf.graph is None and wf.last_agent is not None and agent != wf.last_agent:
            after = self._learned.setdefault(wf.last_agent, set())
            if agent not in after:
                after.add(agent)
                self._learned_graph = None
                self._changed()  # every workflow on the learned graph
        if wf.graph is None and agent not in self._learned:
            self._learned.setdefault(agent, set())
            self._learned_graph = None
        step = self.graph_of(wf).step_for(agent, wf.current)
        current = frozenset([step]) if step is not None else wf.current
        if current != wf.current:
            wf.current = current
            self._changed(workflow_id)
        wf.last_agent = agent

    def steps_to_execution(self, workflow_id: str, agent: str) -> float:
        dist = self._distances.get(workflow_id)
        if dist is None:
            wf = self._workflows.get(workflow_id)
            if wf is None:
                return INF
            dist = self._distances[workflow_id] = self.graph_of(wf).distances(wf.current)
        return dist.get(agent, INF)

    def tags_steps(self, tags: Iterable[tuple[str, str]]) -> float:
        """A cache node's steps-to-execution: the minimum over its `(workflow, agent)` tags."""
        return min((self.steps_to_execution(w, a) for w, a in tags), default=INF)

    def next_agents(self, workflow_id: str) -> list[str]:
        """The agents of the step(s) after the current one (distance 1)."""
        wf = self._workflows.get(workflow_id)
        if wf is None:
            return []
        self.steps_to_execution(workflow_id, "")  # fills the memo
        return sorted(a for a, d in self._distances[workflow_id].items() if d == 1)

    def current_agents(self) -> list[tuple[str, str]]:
        """`(workflow, agent)` of every live workflow's current step (distance 0)."""
        out = []
        for workflow_id in self._workflows:
            self.steps_to_execution(workflow_id, "")  # fills the memo
            out.extend((workflow_id, a) for a, d in self._distances[workflow_id].items() if d == 0)
        return out

    def remember_node(self, workflow_id: str, agent: str, node: object) -> None:
        self._get(workflow_id).agent_nodes[agent] = node
        self._latest_nodes[agent] = node

    def agent_node(self, workflow_id: str, agent: str) -> object | None:
        """The cache node of the agent's last run in this workflow, else in any workflow (agents of
        the same name share their fixed prompt across workflows)."""
        wf = self._workflows.get(workflow_id)
        node = None if wf is None else wf.agent_nodes.get(agent)
        return node if node is not None else self._latest_nodes.get(agent)

    def is_live(self, workflow_id: str) -> bool:
        return workflow_id in self._workflows

    def reset(self) -> None:
        for wf in self._workflows.values():
            wf.agent_nodes.clear()
        self._latest_nodes.clear()
