"""Tree of thought (the paper's deep variant): plan, execute, reflect, answer, each level forking
every branch of the level before, then a majority vote over the leaves' answers.

The pattern: `fork` copies the state into branches that run concurrently; before the branches
start, the frontend sends their shared prefix once (a prefill-only request), so every branch's
first request finds it cached. Deeper levels share ever longer prefixes: the radix tree keeps
them all, one node per branch point.

    @sgl.function
    def tree_search(s, question, instructions, width, node_tokens):
        s += "Question: " + question + "\\n"
        leaves = [s]
        for level, instruction in zip(LEVELS, instructions):
            next_leaves = []
            for leaf in leaves:
                leaf += instruction
                branches = leaf.fork(width)
                branches += lambda i: f"{level} {i + 1}:" + sgl.gen("thought", max_tokens=node_tokens)
                next_leaves += branches
            leaves = next_leaves
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, rng_for
from plait.bench.programs.workload import Structure, Workload

LEVELS = ("Plan", "Execute", "Reflect", "Answer")


@dataclass(frozen=True)
class Shape:
    programs: int
    width: int  # branches per fork
    depth: int  # levels, from LEVELS
    question_tokens: tuple[int, int]
    instruction_tokens: tuple[int, int]
    node_tokens: int  # what each branch generates
    latency_programs: int


SHAPES = {
    # The paper: GSM-8K questions of 80-150 tokens, 2 branches x 4 levels (30 generations of up to 256 tokens),
    # level instructions of 30-60 tokens.
    "paper": Shape(programs=32, width=2, depth=4, question_tokens=(80, 150), instruction_tokens=(30, 60),
                   node_tokens=192, latency_programs=4),
    "cpu": Shape(programs=8, width=2, depth=4, question_tokens=(80, 150), instruction_tokens=(30, 60),
                 node_tokens=16, latency_programs=2),
    "quick": Shape(programs=1, width=2, depth=2, question_tokens=(10, 15), instruction_tokens=(4, 6),
                   node_tokens=4, latency_programs=1),
}


@sgl.function
def tree_search(s, question, instructions, width, node_tokens):
    s += "Question: " + question + "\n"
    leaves = [s]
    for level, instruction in zip(LEVELS, instructions):
        next_leaves = []
        for leaf in leaves:
            leaf += "\n" + instruction + "\n"
            branches = leaf.fork(width)
            branches += lambda i: f"{level} {i + 1}:" + sgl.gen("thought", max_tokens=node_tokens)
            next_leaves += branches
        leaves = next_leaves
    answers = [leaf["thought"].strip() for leaf in leaves]
    s["answer"] = Counter(answers).most_common(1)[0][0]


def make_args(shape: Shape, seed: int) -> list[dict]:
    args = []
    for p in range(shape.programs):
        rng = rng_for(seed, "tot", p)
        args.append({"question": between(rng, *shape.question_tokens),
                     "instructions": [between(rng, *shape.instruction_tokens) for _ in range(shape.depth)],
                     "width": shape.width, "node_tokens": shape.node_tokens})
    return args


def structure(shape: Shape, args: dict) -> Structure:
    levels = range(1, shape.depth + 1)
    gens = sum(shape.width**k for k in levels)
    return Structure(gens=gens, forks=sum(shape.width ** (k - 1) for k in levels), branches=gens)


WORKLOAD = Workload(name="tree_of_thought", title="Tree of thought", program=tree_search, shapes=SHAPES,
                    make_args=make_args, structure=structure)
