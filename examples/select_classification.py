"""Classification with `select`: the model scores every label in one batched request and the most
likely one wins (no parsing of free text). The three choice methods can disagree; all are shown."""

from common import setup

import plait as sgl

LABELS = ["positive", "negative", "neutral"]
METHODS = {"token_length_normalized": sgl.token_length_normalized,
           "greedy_token_selection": sgl.greedy_token_selection,
           "unconditional_likelihood_normalized": sgl.unconditional_likelihood_normalized}


@sgl.function
def classify(s, review, method):
    s += "Classify the sentiment of each review as positive, negative or neutral.\n\n"
    s += "Review: The food was cold and the waiter ignored us.\nSentiment: negative\n\n"
    s += "Review: Best concert I have been to in years!\nSentiment: positive\n\n"
    s += "Review: " + review + "\nSentiment: " + sgl.select("label", choices=LABELS, choices_method=method)


if __name__ == "__main__":
    setup(__doc__)
    reviews = ["The hotel room was spotless and the staff were lovely.",
               "The package arrived on Tuesday.",
               "I waited an hour and then they lost my order."]
    for name, method in METHODS.items():
        states = classify.run_batch([{"review": r, "method": method} for r in reviews])
        print(f"{name}: {[st['label'] for st in states]}")
    state = classify.run(review=reviews[0], method=sgl.token_length_normalized)
    scores = state.get_meta_info("label")["normalized_prompt_logprobs"]
    print("mean token logprob per label:", dict(zip(LABELS, (round(x, 3) for x in scores))))
