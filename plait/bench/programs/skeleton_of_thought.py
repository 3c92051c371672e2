"""Skeleton of thought: write an outline one short tip at a time, and expand each tip into a
paragraph in a sub-program that runs while the outline goes on; then stitch the paragraphs in.

The pattern: calling another `@sgl.function` inside a program starts it at once on its own
thread (on the default backend) and returns its state; reading its variable later waits for it.
Every expansion starts with the same worked examples, computed once for all topics.

    @sgl.function
    def suggest_tips(s, topic, examples, num_tips, tip_tokens, paragraph_tokens):
        s += "USER: Give some tips for " + topic + ".\\nASSISTANT: Okay. Here are the tips.\\n\\n"
        paragraphs = []
        for i in range(1, num_tips + 1):
            s += f"{i}." + sgl.gen(f"tip_{i}", max_tokens=tip_tokens, stop=[".", "\\n"]) + ".\\n"
            paragraphs.append(expand_tip(examples=examples, topic=topic, tip=s[f"tip_{i}"], ...))
        for i, paragraph in enumerate(paragraphs, 1):
            s += f"Tip {i}:" + paragraph["paragraph"] + "\\n"
"""

from __future__ import annotations

from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, name, rng_for
from plait.bench.programs.workload import Structure, Workload


@dataclass(frozen=True)
class Shape:
    topics: int
    num_tips: int
    example_tokens: tuple[int, int]  # each of the 3 worked expansions every sub-program starts with
    tip_tokens: int
    paragraph_tokens: int
    latency_programs: int


SHAPES = {
    # The paper: 64 topics, tips of up to 24 tokens, a ~330-token block of 3 examples, paragraphs of up to 128.
    "paper": Shape(topics=64, num_tips=5, example_tokens=(100, 120), tip_tokens=24, paragraph_tokens=128,
                   latency_programs=8),
    "cpu": Shape(topics=16, num_tips=5, example_tokens=(100, 120), tip_tokens=12, paragraph_tokens=32,
                 latency_programs=2),
    "quick": Shape(topics=1, num_tips=2, example_tokens=(8, 12), tip_tokens=4, paragraph_tokens=6,
                   latency_programs=1),
}


@sgl.function
def expand_tip(s, examples, topic, tip, paragraph_tokens):
    s += examples + "Topic: " + topic + "\nTip: " + tip + "\nParagraph:"
    s += sgl.gen("paragraph", max_tokens=paragraph_tokens, stop="\n\n")


@sgl.function
def suggest_tips(s, topic, examples, num_tips, tip_tokens, paragraph_tokens):
    s += "Please act as a helpful assistant. Your job is to provide users with useful tips on a specific topic.\n"
    s += "USER: Give some tips for " + topic + ".\n"
    s += f"ASSISTANT: Okay. Here are {num_tips} tips for {topic}.\n\n"
    paragraphs = []
    for i in range(1, num_tips + 1):
        s += f"{i}." + sgl.gen(f"tip_{i}", max_tokens=tip_tokens, stop=[".", "\n"]) + ".\n"
        paragraphs.append(expand_tip(examples=examples, topic=topic, tip=s[f"tip_{i}"],
                                     paragraph_tokens=paragraph_tokens))
    for i, paragraph in enumerate(paragraphs, 1):
        s += f"Tip {i}:" + paragraph["paragraph"] + "\n"


def make_args(shape: Shape, seed: int) -> list[dict]:
    rng = rng_for(seed, "sot")
    examples = "Please expand a tip for a topic into a detailed paragraph.\n\n" + "".join(
        f"Topic: {name(rng)}\nTip: {between(rng, 6, 10)}\nParagraph: {between(rng, *shape.example_tokens)}\n\n"
        for _ in range(3))
    return [{"topic": name(rng_for(seed, "sot", t)), "examples": examples, "num_tips": shape.num_tips,
             "tip_tokens": shape.tip_tokens, "paragraph_tokens": shape.paragraph_tokens} for t in range(shape.topics)]


WORKLOAD = Workload(
    name="skeleton_of_thought", title="Skeleton of thought", program=suggest_tips, shapes=SHAPES,
    make_args=make_args, structure=lambda shape, args: Structure(gens=2 * shape.num_tips),
)
