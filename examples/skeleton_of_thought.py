"""Skeleton of thought: first a short outline, then every point is expanded in parallel (one fork
per point), then the expansions are stitched together. Parallel branches run in one batch."""

from common import setup

import plait as sgl

NUM_POINTS = 3


@sgl.function
def skeleton_of_thought(s, question):
    s += "Give the skeleton of an answer as short points of three to five words each.\n\n"
    s += "Question: How can I sleep better?\n1. Keep a regular schedule\n2. Avoid screens before bed\n"
    s += "3. Keep the bedroom cool\n\n"
    s += "Question: " + question + "\n"
    for i in range(1, NUM_POINTS + 1):
        s += f"{i}." + sgl.gen(f"point_{i}", max_tokens=16, stop="\n") + "\n"
    branches = s.fork(NUM_POINTS)
    for i, branch in enumerate(branches, start=1):
        branch += f"\nExplain point {i} in two full sentences: " + sgl.gen("expansion", max_tokens=64, stop="\n\n")
    branches.join()
    s += "\nFull answer:\n"
    for i, expansion in enumerate(s["expansion"], start=1):
        s += f"{i}. {s[f'point_{i}'].strip()}: {expansion.strip()}\n"


if __name__ == "__main__":
    setup(__doc__)
    state = skeleton_of_thought.run(question="How can a small town reduce traffic jams?", temperature=0)
    print(state.text())
