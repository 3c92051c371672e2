"""Document analysis with Plait: per-section summaries and entities (in parallel), answers to
questions with a yes/no support check, the document's tone, and an executive summary.
The same workflow with the raw `openai` client is document_analysis_openai.py."""

import json
import pathlib

from common import setup

import plait as sgl

SYSTEM = "You are a careful analyst. Answer briefly and only from the given text."
TONES = ["optimistic", "pessimistic", "balanced"]
QUESTIONS = ["Who leads the transport department?", "Why is the bicycle bridge late?",
             "How many affordable apartments have been completed?", "What did the council vote for?"]


@sgl.function
def analyze_section(s, section):
    s += sgl.system(SYSTEM)
    s += sgl.user("Section:\n" + section + "\n\nSummarize this section in one sentence.")
    s += sgl.assistant(sgl.gen("summary", max_tokens=64, stop="\n"))
    s += sgl.user("List the people and organizations it mentions, separated by commas.")
    s += sgl.assistant(sgl.gen("entities", max_tokens=48, stop="\n"))


@sgl.function
def answer_question(s, document, question):
    s += sgl.system(SYSTEM)
    s += sgl.user("Document:\n" + document + "\n\nQuestion: " + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=48, stop="\n"))
    s += sgl.user("Is your answer supported by the document? Answer yes or no.")
    s += sgl.assistant(sgl.select("supported", choices=["yes", "no"]))


@sgl.function
def overview(s, document, summaries):
    s += sgl.system(SYSTEM)
    s += sgl.user("Document:\n" + document + "\n\nIs the overall tone optimistic, pessimistic or balanced?")
    s += sgl.assistant(sgl.select("tone", choices=TONES))
    s += sgl.user("Section summaries:\n" + "\n".join(summaries) + "\n\nWrite a three-sentence executive summary.")
    s += sgl.assistant(sgl.gen("executive_summary", max_tokens=128))


def analyze(document: str) -> dict:
    sections = [p.strip() for p in document.split("\n\n") if p.strip()]
    section_states = analyze_section.run_batch([{"section": x} for x in sections], temperature=0)
    qa_states = answer_question.run_batch([{"document": document, "question": q} for q in QUESTIONS],
                                          temperature=0)
    summaries = [st["summary"].strip() for st in section_states]
    top = overview.run(document=document, summaries=summaries, temperature=0)
    return {
        "tone": top["tone"],
        "executive_summary": top["executive_summary"].strip(),
        "sections": [{"summary": summary, "entities": [e.strip() for e in st["entities"].split(",") if e.strip()]}
                     for summary, st in zip(summaries, section_states)],
        "questions": [{"question": q, "answer": st["answer"].strip(), "supported": st["supported"] == "yes"}
                      for q, st in zip(QUESTIONS, qa_states)],
    }


if __name__ == "__main__":
    setup(__doc__)
    document = (pathlib.Path(__file__).parent / "document.txt").read_text()
    print(json.dumps(analyze(document), indent=2))
