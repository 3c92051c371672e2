"""Multi-turn chat: role blocks render with the model's chat template; each turn resends the whole
conversation and hits the prefix cache. With --stream the last answer is printed as it arrives."""

from common import setup

import plait as sgl


@sgl.function
def chat(s, turns):
    s += sgl.system("You are a friendly travel guide. Answer in two sentences or fewer.")
    for i, question in enumerate(turns):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=64))


if __name__ == "__main__":
    args = setup(__doc__, stream={"action": "store_true"})
    turns = ["I have one day in Paris. What should I see?", "And where should I eat dinner?",
             "How do I get to the airport afterwards?"]
    state = chat.run(turns=turns, temperature=0, stream=args.stream)
    if args.stream:
        for chunk in state.text_iter():
            print(chunk, end="", flush=True)
        print()
    else:
        for message in state.messages():
            print(f"[{message['role']}] {message['content']}")
