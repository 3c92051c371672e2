"""Tree of thought: fork the state into several lines of reasoning, fork each again, score every
leaf with `select`, and keep the best. Forks share the prompt's KV cache (the frontend sends the
shared prefix once before the branches start)."""

from common import setup

import plait as sgl

WIDTH = 2


@sgl.function
def tree_of_thought(s, question):
    s += "Question: " + question + "\n"
    plans = s.fork(WIDTH)
    plans += lambda i: f"Approach {i + 1}:" + sgl.gen("plan", max_tokens=48, stop="\n", temperature=0.8)
    leaves = []
    for plan in plans:
        steps = plan.fork(WIDTH)
        steps += "\nCarrying it out:" + sgl.gen("steps", max_tokens=64, stop="\n\n", temperature=0.8)
        steps += "\nIs this reasoning correct? Answer:" + sgl.select("verdict", choices=[" yes", " no"])
        leaves += list(steps)
    scored = [(leaf.get_meta_info("verdict")["normalized_prompt_logprobs"][0], leaf) for leaf in leaves]
    best = max(scored, key=lambda pair: pair[0])[1]
    s += "Best reasoning:" + best["steps"] + "\nFinal answer:" + sgl.gen("answer", max_tokens=32, stop="\n")


if __name__ == "__main__":
    setup(__doc__)
    state = tree_of_thought.run(question="A farmer has 17 sheep and all but 9 run away. How many are left?")
    print(state.text())
