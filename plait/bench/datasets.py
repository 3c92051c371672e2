"""Synthetic workloads shared by the benchmark programs, as token-id prompts of exact lengths.

Prompts are random *text* tokens: ids drawn from the normal vocabulary, never the special or
added tokens (BOS, `<|im_start|>`, ...), so a real model sees something like text and no
control token changes its behaviour. Every request asks for an exact number of output tokens
(the runners pass `ignore_eos`), so two engines given the same dataset do the same work.

    ids = text_token_ids(tokenizer, vocab_size)
    reqs = generated_shared_prefix(ids, num_groups=8, prompts_per_group=16, system_prompt_len=1024,
                                   question_len=64, output_len=32, seed=0)
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

DATASETS = ("random", "generated-shared-prefix")


class BenchRequest(NamedTuple):
    prompt_ids: list[int]
    output_len: int  # exact number of tokens to generate
    group: int | None = None  # shared-prefix group, None when nothing is shared on purpose


class DatasetSummary(NamedTuple):
    num_requests: int
    input_tokens: int
    output_tokens: int
    # Share of input tokens a perfect prefix cache (large enough, cold at start) can skip:
    # every prompt's longest prefix shared with an earlier prompt of the dataset.
    ideal_hit_rate: float


def text_token_ids(tokenizer: Any | None, vocab_size: int) -> list[int]:
    """Ids of ordinary text tokens: the vocabulary minus special and added tokens.

    `tokenizer` is a `plait.runtime.tokenizer.Tokenizer`, a Hugging Face tokenizer, or None (a
    dummy model without one: every id below `vocab_size` is allowed).
    """
    if tokenizer is None:
        return list(range(vocab_size))
    hf = getattr(tokenizer, "hf", tokenizer)
    excluded = {int(i) for i in getattr(hf, "all_special_ids", []) or []}
    excluded |= {int(i) for i in (getattr(hf, "added_tokens_decoder", None) or {})}
    ids = [i for i in range(min(vocab_size, len(hf))) if i not in excluded]
    assert ids, "the vocabulary has no ordinary tokens"
    return ids


def random_dataset(
    token_ids: Sequence[int],
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 1.0,
    seed: int = 0,
) -> list[BenchRequest]:
    """`num_prompts` independent prompts; lengths uniform in [len * range_ratio, len] (SGLang's rule)."""
    assert 0.0 < range_ratio <= 1.0 and input_len >= 1 and output_len >= 1
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        n_in = rng.randint(max(1, int(input_len * range_ratio)), input_len)
        n_out = rng.randint(max(1, int(output_len * range_ratio)), output_len)
        requests.append(BenchRequest(rng.choices(token_ids, k=n_in), n_out))
    return requests


def generated_shared_prefix(
    token_ids: Sequence[int],
    *,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    seed: int = 0,
    shuffle: bool = True,
) -> list[BenchRequest]:
    """G groups of P prompts = the group's system prompt (S tokens) + an own question (Q tokens).

    Requests are shuffled across groups (as SGLang's generator does), so arrival order alone
    does not hand the scheduler the cache-friendly order.
    """
    assert num_groups >= 1 and prompts_per_group >= 1 and system_prompt_len >= 0 and question_len >= 1
    rng = random.Random(seed)
    requests = []
    for group in range(num_groups):
        system = rng.choices(token_ids, k=system_prompt_len)
        for _ in range(prompts_per_group):
            requests.append(BenchRequest(system + rng.choices(token_ids, k=question_len), output_len, group))
    if shuffle:
        rng.shuffle(requests)
    return requests


def summarize(requests: Sequence[BenchRequest]) -> DatasetSummary:
    input_tokens = sum(len(r.prompt_ids) for r in requests)
    return DatasetSummary(
        num_requests=len(requests),
        input_tokens=input_tokens,
        output_tokens=sum(r.output_len for r in requests),
        ideal_hit_rate=_shared_prefix_tokens(requests) / max(1, input_tokens),
    )


def _shared_prefix_tokens(requests: Sequence[BenchRequest]) -> int:
    """Sum over prompts of the longest prefix shared with any earlier prompt (a trie walk)."""
    root: dict[int, dict] = {}
    shared = 0
    for r in requests:
        node, matching = root, True
        for t in r.prompt_ids:
            child = node.get(t)
            if child is None:
                matching = False
                child = node[t] = {}
            elif matching:
                shared += 1
            node = child
    return shared


# ---- command line ---------------------------------------------------------------------------------
def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset-name", choices=DATASETS, default="random")
    g.add_argument("--num-prompts", type=int, default=64, help="random: number of prompts")
    g.add_argument("--random-input-len", type=int, default=256)
    g.add_argument("--random-output-len", type=int, default=32)
    g.add_argument("--random-range-ratio", type=float, default=1.0,
                   help="random: lengths uniform in [len * ratio, len]; 1.0 = exact lengths")
    g.add_argument("--gsp-num-groups", type=int, default=8)
    g.add_argument("--gsp-prompts-per-group", type=int, default=16)
    g.add_argument("--gsp-system-prompt-len", type=int, default=1024)
    g.add_argument("--gsp-question-len", type=int, default=64)
    g.add_argument("--gsp-output-len", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)


def dataset_from_args(args: argparse.Namespace, token_ids: Sequence[int]) -> list[BenchRequest]:
    if args.dataset_name == "random":
        return random_dataset(
            token_ids, num_prompts=args.num_prompts, input_len=args.random_input_len,
            output_len=args.random_output_len, range_ratio=args.random_range_ratio, seed=args.seed,
        )
    return generated_shared_prefix(
        token_ids, num_groups=args.gsp_num_groups, prompts_per_group=args.gsp_prompts_per_group,
        system_prompt_len=args.gsp_system_prompt_len, question_len=args.gsp_question_len,
        output_len=args.gsp_output_len, seed=args.seed,
    )


def dataset_params(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define the dataset, for the result record."""
    if args.dataset_name == "random":
        names = ("num_prompts", "random_input_len", "random_output_len", "random_range_ratio")
    else:
        names = ("gsp_num_groups", "gsp_prompts_per_group", "gsp_system_prompt_len", "gsp_question_len",
                 "gsp_output_len")
    return {"dataset_name": args.dataset_name, "seed": args.seed, **{k: getattr(args, k) for k in names}}
