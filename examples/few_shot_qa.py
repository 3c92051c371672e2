"""Few-shot question answering: a fixed block of examples, then the question; `run_batch` answers
many questions at once, and every request after the first reuses the examples' KV cache."""

from common import setup

import plait as sgl

EXAMPLES = """The following are questions with short, factual answers.

Q: What is the capital of France?
A: Paris

Q: How many legs does a spider have?
A: Eight

Q: Which planet is known as the Red Planet?
A: Mars

"""


@sgl.function
def few_shot_qa(s, question):
    s += EXAMPLES
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", max_tokens=16, stop="\n")


if __name__ == "__main__":
    setup(__doc__)
    questions = ["What is the capital of Japan?", "What is the largest ocean on Earth?",
                 "Who wrote Romeo and Juliet?", "What gas do plants absorb from the air?"]
    states = few_shot_qa.run_batch([{"question": q} for q in questions], temperature=0, progress_bar=True)
    for q, state in zip(questions, states):
        print(f"{q}\n  -> {state['answer'].strip()}")
