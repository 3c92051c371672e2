"""MMLU-shaped 5-shot multiple choice: one `gen` of one token after a few-shot block.

The pattern: every question of a subject starts with the same header and five worked examples,
so the runtime's prefix cache computes that block once per subject and each question costs only
its own tokens. The program itself does nothing special for it: it sends the whole prompt and
relies on the cache.

    @sgl.function
    def five_shot(s, examples, question, choices):
        s += examples + format_question(question, choices) + "Answer:"
        s += sgl.gen("answer", max_tokens=1)
"""

from __future__ import annotations

from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, name, rng_for
from plait.bench.programs.workload import Structure, Workload

LETTERS = "ABCD"


@dataclass(frozen=True)
class Shape:
    subjects: int
    questions_per_subject: int
    example_tokens: tuple[int, int]  # each of the 5 worked examples (question and choices)
    question_tokens: tuple[int, int]
    latency_programs: int


SHAPES = {
    # The paper: 57 subjects, few-shot blocks cut to 1,536 tokens (median ~600), questions of 60-200 tokens.
    "paper": Shape(subjects=16, questions_per_subject=64, example_tokens=(80, 220), question_tokens=(60, 200),
                   latency_programs=16),
    "cpu": Shape(subjects=4, questions_per_subject=16, example_tokens=(70, 110), question_tokens=(50, 80),
                 latency_programs=8),
    "quick": Shape(subjects=2, questions_per_subject=2, example_tokens=(20, 30), question_tokens=(10, 20),
                   latency_programs=1),
}


def format_question(question: str, choices: list[str]) -> str:
    return question + "\n" + "".join(f"{letter}. {c}\n" for letter, c in zip(LETTERS, choices))


@sgl.function
def five_shot(s, examples, question, choices):
    s += examples + format_question(question, choices) + "Answer:"
    s += sgl.gen("answer", max_tokens=1)


def make_args(shape: Shape, seed: int) -> list[dict]:
    args = []
    for subject in range(shape.subjects):
        rng = rng_for(seed, "mmlu", subject)
        topic = name(rng)
        examples = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        for _ in range(5):
            lo, hi = shape.example_tokens
            choices = [between(rng, 3, 8) for _ in LETTERS]
            examples += format_question(between(rng, lo, hi), choices) + f"Answer: {rng.choice(LETTERS)}\n\n"
        for q in range(shape.questions_per_subject):
            qrng = rng_for(seed, "mmlu", subject, q)
            args.append({"examples": examples, "question": between(qrng, *shape.question_tokens),
                         "choices": [between(qrng, 3, 8) for _ in LETTERS]})
    # Subjects interleaved, as a real evaluation's queue would mix them.
    return [args[i] for i in rng_for(seed, "mmlu-order").sample(range(len(args)), len(args))]


WORKLOAD = Workload(
    name="mmlu", title="MMLU (5-shot)", program=five_shot, shapes=SHAPES, make_args=make_args,
    structure=lambda shape, args: Structure(gens=1),
)
