"""The SGLang paper's workloads as ordinary Plait programs, and a suite that runs them.

One module per workload, each a short program a user can read as an example of its pattern
(few-shot prefixes, `select`, agents, `fork`/`join`, sub-programs, regex constraints, chat roles,
retrieval), with synthetic stand-ins for the paper's data (lengths, branching and sharing of the
paper's shapes; nothing is downloaded):

    mmlu                 five-shot multiple choice, one token out
    hellaswag            `select` among four endings after a shared few-shot block
    react                a ReAct agent replaying recorded trajectories
    generative_agents    the short calls of simulated agents
    tree_of_thought      plan / execute / reflect / answer, each level forking every branch
    skeleton_of_thought  an outline whose tips expand in parallel sub-programs
    llm_judge            branch-solve-merge: six judging branches, then a merged score
    json_decode          a JSON object filled field by field under regexes
    multi_turn_chat      four-turn conversations, short and long answers
    dspy_rag             retrieval, then a DSPy-style chain-of-thought prompt

`python -m plait.bench.programs --help` runs them (docs/benchmarks.md).
"""

from __future__ import annotations

from plait.bench.programs import (
    dspy_rag,
    generative_agents,
    hellaswag,
    json_decode,
    llm_judge,
    mmlu,
    multi_turn_chat,
    react,
    skeleton_of_thought,
    tree_of_thought,
)
from plait.bench.programs.workload import SIZES, Structure, Workload

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    mmlu.WORKLOAD, hellaswag.WORKLOAD, react.WORKLOAD, generative_agents.WORKLOAD, tree_of_thought.WORKLOAD,
    skeleton_of_thought.WORKLOAD, llm_judge.WORKLOAD, json_decode.WORKLOAD, multi_turn_chat.SHORT_WORKLOAD,
    multi_turn_chat.LONG_WORKLOAD, dspy_rag.WORKLOAD,
)}

__all__ = ["SIZES", "WORKLOADS", "Structure", "Workload"]
