"""DSPy-shaped retrieval-augmented answering: retrieve three passages for the question (in Python,
from a local store), then one chain-of-thought call whose prompt is a compiled DSPy module's:
instructions, a few worked demonstrations, the passages, the question.

The pattern: a pipeline step that is plain Python (retrieval) inside the program, then a long
prompt whose first part (instructions and demonstrations, the bulk of it) is the same for every
question and is computed once.

    @sgl.function
    def rag(s, retriever, instructions, demos, question, reasoning_tokens):
        passages = retriever.search(question, k=3)
        s += instructions + demos + format_context(passages)
        s += "Question: " + question + "\\nReasoning: Let's think step by step in order to"
        s += sgl.gen("reasoning", max_tokens=reasoning_tokens, stop="\\n\\n")
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, rng_for
from plait.bench.programs.workload import Structure, Workload


@dataclass(frozen=True)
class Shape:
    questions: int
    store_passages: int
    demos: int
    passage_tokens: tuple[int, int]
    reasoning_tokens: int
    latency_programs: int


SHAPES = {
    # The paper: a compiled ChainOfThought over HotPotQA (instructions + ~4 demonstrations, 1.5-2.5K tokens),
    # 3 retrieved passages of 100-150 tokens per question, 50-100 output tokens.
    "paper": Shape(questions=150, store_passages=2000, demos=4, passage_tokens=(100, 150), reasoning_tokens=80,
                   latency_programs=8),
    "cpu": Shape(questions=32, store_passages=200, demos=4, passage_tokens=(40, 60), reasoning_tokens=24,
                 latency_programs=4),
    "quick": Shape(questions=2, store_passages=12, demos=1, passage_tokens=(8, 12), reasoning_tokens=4,
                   latency_programs=1),
}


class Retriever:
    """A bag-of-words store: passages ranked by the words they share with the query."""

    def __init__(self, passages: list[str]):
        self.passages = passages
        self.bags = [Counter(p.lower().split()) for p in passages]

    def search(self, query: str, k: int) -> list[str]:
        words = set(query.lower().split())
        scores = [sum(bag[w] for w in words) for bag in self.bags]
        best = sorted(range(len(self.passages)), key=lambda i: (-scores[i], i))[:k]
        return [self.passages[i] for i in best]


def format_context(passages: list[str]) -> str:
    return "Context:\n" + "".join(f"[{i}] «{p}»\n" for i, p in enumerate(passages, 1))


@sgl.function
def rag(s, retriever, instructions, demos, question, reasoning_tokens):
    passages = retriever.search(question, k=3)
    s += instructions + demos + format_context(passages)
    s += "Question: " + question + "\nReasoning: Let's think step by step in order to"
    s += sgl.gen("reasoning", max_tokens=reasoning_tokens, stop="\n\n")


def make_args(shape: Shape, seed: int) -> list[dict]:
    rng = rng_for(seed, "rag")
    retriever = Retriever([between(rng, *shape.passage_tokens) for _ in range(shape.store_passages)])
    instructions = ("Answer questions with short factoid answers.\n\n---\n\nFollow the following format.\n\n"
                    "Context: may contain relevant facts\nQuestion: ${question}\nReasoning: Let's think step by step "
                    "in order to ${produce the answer}. We ...\nAnswer: often between 1 and 5 words\n\n---\n\n")
    demos = ""
    for _ in range(shape.demos):
        demos += format_context([between(rng, *shape.passage_tokens) for _ in range(3)])
        demos += f"Question: {between(rng, 10, 16)}\nReasoning: Let's think step by step in order to "
        demos += f"{between(rng, 20, 40)}\nAnswer: {between(rng, 2, 4)}\n\n---\n\n"
    args = []
    for q in range(shape.questions):
        qrng = rng_for(seed, "rag", q)
        source = qrng.choice(retriever.passages).split()
        question = " ".join(qrng.sample(source, min(8, len(source)))).rstrip(".").capitalize() + "?"
        args.append({"retriever": retriever, "instructions": instructions, "demos": demos, "question": question,
                     "reasoning_tokens": shape.reasoning_tokens})
    return args


WORKLOAD = Workload(
    name="dspy_rag", title="DSPy RAG", program=rag, shapes=SHAPES, make_args=make_args,
    structure=lambda shape, args: Structure(gens=1),
)
