"""Multi-turn chat: conversations of four user turns, each answered by the model, with short
answers (a few tokens) or long ones.

The pattern: role blocks (`sgl.user`, `sgl.assistant`) render through the model's chat template;
each turn's request is the whole conversation so far, and the runtime's cache holds the history,
so a turn costs only its new message. With long answers decoding dominates and the cache matters
little (the paper's chat-long shows almost no gain).

    @sgl.function
    def chat(s, turns, answer_tokens):
        for i, (turn, max_tokens) in enumerate(zip(turns, answer_tokens)):
            s += sgl.user(turn)
            s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=max_tokens))
"""

from __future__ import annotations

from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, rng_for
from plait.bench.programs.workload import Structure, Workload


@dataclass(frozen=True)
class Shape:
    conversations: int
    turns: int
    user_tokens: tuple[int, int]
    answer_tokens: tuple[int, int]
    latency_programs: int


SHORT = {
    # The paper: 20 conversations x 4 turns, user turns of 256-512 tokens, answers of 4-8 (short) or 256-512 (long).
    "paper": Shape(conversations=20, turns=4, user_tokens=(256, 512), answer_tokens=(4, 8), latency_programs=4),
    "cpu": Shape(conversations=16, turns=4, user_tokens=(64, 128), answer_tokens=(4, 8), latency_programs=2),
    "quick": Shape(conversations=2, turns=2, user_tokens=(8, 12), answer_tokens=(2, 3), latency_programs=1),
}
LONG = {
    "paper": Shape(conversations=20, turns=4, user_tokens=(256, 512), answer_tokens=(256, 512), latency_programs=2),
    "cpu": Shape(conversations=12, turns=4, user_tokens=(64, 128), answer_tokens=(48, 64), latency_programs=1),
    "quick": Shape(conversations=1, turns=2, user_tokens=(8, 12), answer_tokens=(6, 8), latency_programs=1),
}


@sgl.function
def chat(s, turns, answer_tokens):
    for i, (turn, max_tokens) in enumerate(zip(turns, answer_tokens)):
        s += sgl.user(turn)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=max_tokens))


def make_args(shape: Shape, seed: int) -> list[dict]:
    args = []
    for c in range(shape.conversations):
        rng = rng_for(seed, "chat", shape.answer_tokens, c)
        args.append({"turns": [between(rng, *shape.user_tokens) for _ in range(shape.turns)],
                     "answer_tokens": [rng.randint(*shape.answer_tokens) for _ in range(shape.turns)]})
    return args


SHORT_WORKLOAD = Workload(
    name="chat_short", title="Chat (short)", program=chat, shapes=SHORT, make_args=make_args,
    structure=lambda shape, args: Structure(gens=shape.turns),
)
LONG_WORKLOAD = Workload(
    name="chat_long", title="Chat (long)", program=chat, shapes=LONG, make_args=make_args,
    structure=lambda shape, args: Structure(gens=shape.turns),
)
