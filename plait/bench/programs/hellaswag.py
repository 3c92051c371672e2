"""HellaSwag-shaped `select`: a fixed few-shot block, a context, and a choice among four endings.

The pattern: `select` scores every ending in one batched request (the prompt is shared by the
four), so a question costs its context once plus its four endings, and the few-shot block,
shared by every question, is computed once for the whole run.

    @sgl.function
    def choose_ending(s, shots, context, endings):
        s += shots + context
        s += sgl.select("ending", choices=endings)
"""

from __future__ import annotations

from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, rng_for
from plait.bench.programs.workload import Structure, Workload


@dataclass(frozen=True)
class Shape:
    questions: int
    shots: int  # worked examples in the shared block
    shot_tokens: tuple[int, int]
    context_tokens: tuple[int, int]
    ending_tokens: tuple[int, int]
    latency_programs: int


SHAPES = {
    # The paper: 20 shots (a 1.5-2.2K-token block), 200 questions of 40-80 tokens, endings of 15-40.
    "paper": Shape(questions=200, shots=20, shot_tokens=(70, 110), context_tokens=(40, 80), ending_tokens=(15, 40),
                   latency_programs=16),
    "cpu": Shape(questions=64, shots=12, shot_tokens=(40, 60), context_tokens=(30, 50), ending_tokens=(12, 24),
                 latency_programs=8),
    "quick": Shape(questions=3, shots=2, shot_tokens=(15, 20), context_tokens=(8, 12), ending_tokens=(3, 6),
                   latency_programs=1),
}


@sgl.function
def choose_ending(s, shots, context, endings):
    s += shots + context
    s += sgl.select("ending", choices=endings)


def make_args(shape: Shape, seed: int) -> list[dict]:
    rng = rng_for(seed, "hellaswag")
    shots = "".join(between(rng, *shape.shot_tokens) + "\n\n" for _ in range(shape.shots))
    args = []
    for q in range(shape.questions):
        qrng = rng_for(seed, "hellaswag", q)
        args.append({"shots": shots, "context": between(qrng, *shape.context_tokens),
                     "endings": [" " + between(qrng, *shape.ending_tokens) for _ in range(4)]})
    return args


WORKLOAD = Workload(
    name="hellaswag", title="HellaSwag (select)", program=choose_ending, shapes=SHAPES, make_args=make_args,
    structure=lambda shape, args: Structure(gens=0, selects=1),
)
