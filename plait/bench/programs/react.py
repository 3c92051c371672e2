"""ReAct agent, replayed: at each step the model writes its next thought and action, then the
recorded step of a trajectory (thought, action, observation) is appended, as in the paper's
benchmark, so every engine runs the same calls whatever it generates.

The pattern: the growing transcript of one program is reused step after step (each request
extends the previous one), on top of an instruction block with worked examples that every
program shares. The model's attempt runs in a copy of the state (`s.copy()`, a fork of one), so
it costs a request without changing the transcript the next step builds on.

    @sgl.function
    def react_replay(s, instructions, question, trajectory):
        s += instructions + "Question: " + question + "\n"
        for i, step in enumerate(trajectory, 1):
            s += f"Thought {i}:"
            with s.copy() as attempt:
                attempt += sgl.gen(f"attempt_{i}", max_tokens=..., stop="Observation")
            s += step["thought"] + f"\nAction {i}: " + step["action"] + f"\nObservation {i}: " + ...
"""

from __future__ import annotations

from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, name, rng_for
from plait.bench.programs.workload import Structure, Workload

ACTIONS = ("Search", "Lookup")


@dataclass(frozen=True)
class Shape:
    programs: int
    steps: tuple[int, int]  # recorded steps per trajectory
    thought_tokens: tuple[int, int]
    observation_tokens: tuple[int, int]
    attempt_tokens: int  # what the model writes at each step
    examples: int  # worked trajectories in the shared instruction block, shorter than the real ones:
    example_steps: tuple[int, int]
    example_observation_tokens: tuple[int, int]
    latency_programs: int


SHAPES = {
    # The paper: HotpotQA trajectories, a ~1,400-token instruction block (6 worked examples), 3-7 steps,
    # up to 200 tokens per attempt, observations of 80-200 tokens.
    "paper": Shape(programs=100, steps=(3, 7), thought_tokens=(20, 40), observation_tokens=(80, 200),
                   attempt_tokens=128, examples=6, example_steps=(2, 4), example_observation_tokens=(20, 50),
                   latency_programs=8),
    "cpu": Shape(programs=24, steps=(3, 5), thought_tokens=(12, 24), observation_tokens=(40, 80), attempt_tokens=24,
                 examples=4, example_steps=(2, 3), example_observation_tokens=(20, 40), latency_programs=3),
    "quick": Shape(programs=2, steps=(2, 2), thought_tokens=(4, 6), observation_tokens=(6, 10), attempt_tokens=4,
                   examples=1, example_steps=(2, 2), example_observation_tokens=(4, 6), latency_programs=1),
}


def format_step(i: int, step: dict[str, str]) -> str:
    return f"{step['thought']}\nAction {i}: {step['action']}\nObservation {i}: {step['observation']}\n"


@sgl.function
def react_replay(s, instructions, question, trajectory, attempt_tokens):
    s += instructions + "Question: " + question + "\n"
    for i, step in enumerate(trajectory, 1):
        s += f"Thought {i}:"
        with s.copy() as attempt:
            attempt += sgl.gen(f"attempt_{i}", max_tokens=attempt_tokens, stop="Observation")
        s += format_step(i, step)
    s += f"Thought {len(trajectory) + 1}:"
    with s.copy() as attempt:
        attempt += sgl.gen("final_attempt", max_tokens=attempt_tokens, stop="Observation")


def trajectory(rng, steps: tuple[int, int], thought_tokens: tuple[int, int],
               observation_tokens: tuple[int, int]) -> list[dict[str, str]]:
    out = [{"thought": " " + between(rng, *thought_tokens), "action": f"{rng.choice(ACTIONS)}[{name(rng)}]",
            "observation": between(rng, *observation_tokens)} for _ in range(rng.randint(*steps))]
    out[-1]["action"] = f"Finish[{name(rng)}]"
    return out


def make_args(shape: Shape, seed: int) -> list[dict]:
    rng = rng_for(seed, "react")
    instructions = ("Solve a question answering task with interleaving Thought, Action, Observation steps. "
                    "Thought can reason about the current situation, and Action can be three types: "
                    "Search[entity], Lookup[keyword] and Finish[answer].\nHere are some examples.\n")
    for _ in range(shape.examples):
        steps = trajectory(rng, shape.example_steps, shape.thought_tokens, shape.example_observation_tokens)
        instructions += "Question: " + between(rng, 12, 24) + "\n"
        instructions += "".join(f"Thought {i}:" + format_step(i, step) for i, step in enumerate(steps, 1)) + "\n"
    args = []
    for p in range(shape.programs):
        prng = rng_for(seed, "react", p)
        args.append({"instructions": instructions, "question": between(prng, 12, 24),
                     "trajectory": trajectory(prng, shape.steps, shape.thought_tokens, shape.observation_tokens),
                     "attempt_tokens": shape.attempt_tokens})
    return args


def structure(shape: Shape, args: dict) -> Structure:
    calls = len(args["trajectory"]) + 1  # one attempt per recorded step, and a last one
    return Structure(gens=calls, forks=calls, branches=calls)


WORKLOAD = Workload(name="react", title="ReAct agent", program=react_replay, shapes=SHAPES, make_args=make_args,
                    structure=structure)
