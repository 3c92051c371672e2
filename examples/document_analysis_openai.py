"""Document analysis with the raw `openai` client: the same workflow as document_analysis_plait.py
(per-section summaries and entities in parallel, answers with a yes/no support check, the tone,
an executive summary) against the server's OpenAI-compatible API.

    python examples/document_analysis_openai.py --url http://127.0.0.1:30000
"""

import argparse
import json
import math
import pathlib
from concurrent.futures import ThreadPoolExecutor

import openai

SYSTEM = "You are a careful analyst. Answer briefly and only from the given text."
TONES = ["optimistic", "pessimistic", "balanced"]
QUESTIONS = ["Who leads the transport department?", "Why is the bicycle bridge late?",
             "How many affordable apartments have been completed?", "What did the council vote for?"]


class Chat:
    """One conversation: the message list has to be kept by hand."""

    def __init__(self, client, model):
        self.client = client
        self.model = model
        self.messages = [{"role": "system", "content": SYSTEM}]

    def ask(self, question, max_tokens):
        self.messages.append({"role": "user", "content": question})
        response = self.client.chat.completions.create(
            model=self.model, messages=self.messages, max_tokens=max_tokens, temperature=0, stop=["\n"])
        answer = response.choices[0].message.content or ""
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def choose(self, question, choices):
        """Pick a choice by the logprob of its first token (the API cannot score whole choices)."""
        self.messages.append({"role": "user", "content": question})
        response = self.client.chat.completions.create(
            model=self.model, messages=self.messages, max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
        content = response.choices[0].logprobs.content
        scores = {choice: -math.inf for choice in choices}
        for candidate in (content[0].top_logprobs if content else []):
            token = candidate.token.strip().lower()
            for choice in choices:
                if token and choice.startswith(token) and candidate.logprob > scores[choice]:
                    scores[choice] = candidate.logprob
        best = max(choices, key=lambda c: scores[c])
        self.messages.append({"role": "assistant", "content": best})
        return best


def analyze_section(client, model, section):
    chat = Chat(client, model)
    summary = chat.ask("Section:\n" + section + "\n\nSummarize this section in one sentence.", 64)
    entities = chat.ask("List the people and organizations it mentions, separated by commas.", 48)
    return summary.strip(), [e.strip() for e in entities.split(",") if e.strip()]


def answer_question(client, model, document, question):
    chat = Chat(client, model)
    answer = chat.ask("Document:\n" + document + "\n\nQuestion: " + question, 48)
    supported = chat.choose("Is your answer supported by the document? Answer yes or no.", ["yes", "no"])
    return {"question": question, "answer": answer.strip(), "supported": supported == "yes"}


def overview(client, model, document, summaries):
    chat = Chat(client, model)
    tone = chat.choose("Document:\n" + document + "\n\nIs the overall tone optimistic, pessimistic or balanced?",
                       TONES)
    chat.messages.append({"role": "user", "content": "Section summaries:\n" + "\n".join(summaries)
                          + "\n\nWrite a three-sentence executive summary."})
    response = client.chat.completions.create(model=model, messages=chat.messages, max_tokens=128, temperature=0)
    return tone, (response.choices[0].message.content or "").strip()


def analyze(client, model, document):
    sections = [p.strip() for p in document.split("\n\n") if p.strip()]
    with ThreadPoolExecutor(max_workers=16) as pool:
        section_futures = [pool.submit(analyze_section, client, model, x) for x in sections]
        question_futures = [pool.submit(answer_question, client, model, document, q) for q in QUESTIONS]
        section_results = [f.result() for f in section_futures]
        question_results = [f.result() for f in question_futures]
    summaries = [summary for summary, _ in section_results]
    tone, executive_summary = overview(client, model, document, summaries)
    return {
        "tone": tone,
        "executive_summary": executive_summary,
        "sections": [{"summary": summary, "entities": entities} for summary, entities in section_results],
        "questions": question_results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--api-key", default="EMPTY")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key=args.api_key)
    model = client.models.list().data[0].id
    document = (pathlib.Path(__file__).parent / "document.txt").read_text()
    print(json.dumps(analyze(client, model, document), indent=2))
