"""LLM judge, branch-solve-merge: judge an article along six dimensions in parallel branches,
then merge the six judgements into one score.

The pattern: `fork(n)` then `join()` gathers each branch's variable into a list on the parent.
The article is the branches' shared prefix: the frontend sends it once before they start, and
every branch adds only its rubric and its judgement.

    @sgl.function
    def judge(s, article, rubrics, judgement_tokens):
        s += "Please act as an impartial judge ...\\n\\n" + article + "\\n\\n"
        branches = s.fork(len(rubrics))
        branches += lambda i: rubrics[i] + "\\nJudgement:" + sgl.gen("judgement", max_tokens=judgement_tokens,
                                                                    stop="END")
        branches.join()
        for i, judgement in enumerate(s["judgement"], 1):
            s += f"Dimension {i}:{judgement}\\n"
        s += "Overall score (1-10):" + sgl.gen("score", max_tokens=2)
"""

from __future__ import annotations

from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, rng_for
from plait.bench.programs.workload import Structure, Workload

DIMENSIONS = ("clarity", "accuracy", "depth", "structure", "style", "relevance")


@dataclass(frozen=True)
class Shape:
    articles: int
    dimensions: int
    article_tokens: tuple[int, int]
    rubric_tokens: tuple[int, int]
    judgement_tokens: int
    latency_programs: int


SHAPES = {
    # The paper: 25 articles of 600-1,000 tokens, 6 dimensions, rubrics of 60-100 tokens, judgements of up to 256.
    "paper": Shape(articles=64, dimensions=6, article_tokens=(600, 1000), rubric_tokens=(60, 100),
                   judgement_tokens=192, latency_programs=4),
    "cpu": Shape(articles=12, dimensions=6, article_tokens=(300, 500), rubric_tokens=(40, 60), judgement_tokens=32,
                 latency_programs=2),
    "quick": Shape(articles=1, dimensions=3, article_tokens=(20, 30), rubric_tokens=(5, 8), judgement_tokens=4,
                   latency_programs=1),
}


@sgl.function
def judge(s, article, rubrics, judgement_tokens):
    s += "Please act as an impartial judge and evaluate the quality of the article below.\n\n" + article + "\n\n"
    branches = s.fork(len(rubrics))
    branches += lambda i: rubrics[i] + "\nJudgement:" + sgl.gen("judgement", max_tokens=judgement_tokens, stop="END")
    branches.join()
    for i, judgement in enumerate(s["judgement"], 1):
        s += f"Dimension {i}:{judgement}\n"
    s += "Overall score (1-10):" + sgl.gen("score", max_tokens=2)


def make_args(shape: Shape, seed: int) -> list[dict]:
    args = []
    for a in range(shape.articles):
        rng = rng_for(seed, "judge", a)
        rubrics = [f"Judge the article's {d}. " + between(rng, *shape.rubric_tokens)
                   for d in DIMENSIONS[: shape.dimensions]]
        args.append({"article": between(rng, *shape.article_tokens), "rubrics": rubrics,
                     "judgement_tokens": shape.judgement_tokens})
    return args


WORKLOAD = Workload(
    name="llm_judge", title="LLM judge", program=judge, shapes=SHAPES, make_args=make_args,
    structure=lambda shape, args: Structure(gens=shape.dimensions + 1, forks=1, branches=shape.dimensions),
)
