"""Generative agents: the short calls a simulated town's agents make, each its own prompt.

The five call kinds that make most of the Smallville agents' requests (rate how poignant an event
is, turn it into a subject-predicate-object triple, pick an emoji, choose a location sector, then
an object there), each a fixed template with worked examples, then the agent's persona, then
the event. Outputs are a few tokens, so the cost is per request: template and persona are
shared by every call of that kind for that agent, and only the event is new. One program is one
call: a batch runs many agents' calls at once, the latency mode one call at a time, as the paper
replays its trace.

    @sgl.function
    def agent_call(s, template, persona, request, max_tokens, stop):
        s += template + "\n\n" + persona + "\n\n" + request
        s += sgl.gen("answer", max_tokens=max_tokens, stop=stop)
"""

from __future__ import annotations

from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, name, rng_for
from plait.bench.programs.workload import Structure, Workload


@dataclass(frozen=True)
class CallKind:
    name: str
    examples: int  # worked examples in the template
    max_tokens: int
    stop: str | None
    answer_prefix: str


KINDS = (
    CallKind("poignancy", 0, 2, None, "Rating (1-10):"),
    CallKind("event_triple", 6, 20, ")", "Triple: ("),
    CallKind("pronunciatio", 1, 6, None, "Emoji:"),
    CallKind("action_location_sector", 2, 10, "}", "Answer: {"),
    CallKind("action_location_object", 1, 5, "}", "Answer: {"),
)


@dataclass(frozen=True)
class Shape:
    agents: int
    events_per_agent: int  # each event makes one call of every kind
    persona_tokens: tuple[int, int]
    example_tokens: tuple[int, int]
    event_tokens: tuple[int, int]
    latency_programs: int


SHAPES = {
    # The paper: a trace of 1,000 calls from about 25 agents; templates of 30-400 tokens, personas of 200-500.
    "paper": Shape(agents=25, events_per_agent=8, persona_tokens=(200, 500), example_tokens=(40, 60),
                   event_tokens=(15, 40), latency_programs=20),
    "cpu": Shape(agents=8, events_per_agent=3, persona_tokens=(120, 200), example_tokens=(25, 40),
                 event_tokens=(12, 24), latency_programs=10),
    "quick": Shape(agents=1, events_per_agent=1, persona_tokens=(10, 15), example_tokens=(5, 8),
                   event_tokens=(4, 6), latency_programs=2),
}


@sgl.function
def agent_call(s, template, persona, request, max_tokens, stop):
    s += template + "\n\n" + persona + "\n\n" + request
    s += sgl.gen("answer", max_tokens=max_tokens, stop=stop)


def make_args(shape: Shape, seed: int) -> list[dict]:
    rng = rng_for(seed, "agents")
    templates = {}
    for kind in KINDS:
        templates[kind.name] = f"Task: {kind.name.replace('_', ' ')}. " + between(rng, 20, 40) + "".join(
            f"\nExample {i + 1}: " + between(rng, *shape.example_tokens) for i in range(kind.examples))
    personas = [f"Name: {name(rng)}. " + between(rng, *shape.persona_tokens) for _ in range(shape.agents)]
    calls = []
    for event in range(shape.events_per_agent):
        for agent, persona in enumerate(personas):
            erng = rng_for(seed, "agents", agent, event)
            happening = "Event: " + between(erng, *shape.event_tokens) + "\n"
            for kind in KINDS:
                calls.append({"template": templates[kind.name], "persona": persona,
                              "request": happening + kind.answer_prefix, "max_tokens": kind.max_tokens,
                              "stop": kind.stop})
    return calls


WORKLOAD = Workload(
    name="generative_agents", title="Generative agents", program=agent_call, shapes=SHAPES, make_args=make_args,
    structure=lambda shape, args: Structure(gens=1),
)
