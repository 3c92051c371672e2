"""Admission: which waiting requests join the next extend batch, and how many tokens each computes.

Budgets: `token_budget` new tokens per batch (prompts longer than `chunk_size` are split, one
chunked request at a time); memory: a request is admitted only if its new tokens plus its expected
future decode tokens (`max_new_tokens * new_token_ratio`) fit in free + evictable slots after what
running requests reserve. In-batch prefix sharing: a request that shares a long uncached prefix
with one admitted in this round waits one round, then hits the cache instead of recomputing.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.runtime.scheduler.cache_manager import CacheManager
from plait.runtime.scheduler.policy import SchedulePolicy
from plait.runtime.scheduler.request import Req

# Shared uncached tokens above which a second request waits for the first one's KV.
IN_BATCH_SHARE_MIN = 32


@dataclass
class PrefillPlan:
    reqs: list[Req]  # admitted, each holding a row and a lock on its prefix
    take_lens: list[int]  # new tokens each computes this step


def plan_prefill(
    *,
    waiting: list[Req],
    chunked: Req | None,
    cache: CacheManager,
    policy: SchedulePolicy,
    token_budget: int,
    chunk_size: int | None,
    reserved_tokens: int,
    num_running: int,
    max_running: int,
    new_token_ratio: float,
) -> PrefillPlan | None:
    reqs: list[Req] = []
    take_lens: list[int] = []
    budget = token_budget
    if chunked is not None:  # a chunked prompt continues first; it already holds its row and lock
        take = min(chunked.seq_len - chunked.kv_committed_len, chunk_size or budget)
        if cache.available_tokens < take:
            return None
        reqs.append(chunked)
        take_lens.append(take)
        budget -= take
        reserved_tokens += take
    admitted_prompts: list[list[int]] = []
    passed_over: list[Req] = []
    ordered = policy.order(waiting, cache) if waiting else []
    for req in ordered:
        if budget <= 0 or num_running + len(reqs) >= max_running:
            passed_over.append(req)
            continue
        if not hasattr(req, "_match"):
            cache.match(req, load_budget=cache.available_tokens - reserved_tokens)
        if cache.waiting_for_load(req):
            passed_over.append(req)
            continue
        fill = req.fill_ids
        if any(_common_prefix_len(fill, p) - req.prefix_len >= IN_BATCH_SHARE_MIN for p in admitted_prompts):
            passed_over.append(req)
            continue
        extend_len = req.seq_len - req.prefix_len
        take = extend_len
        if chunk_size is not None and take > min(budget, chunk_size):
            take = min(budget, chunk_size)
            if any(r.seq_len - r.kv_committed_len > t for r, t in zip(reqs, take_lens)):
                take = 0  # one chunked request at a time
        elif take > budget:
            take = 0
        future = int(min(req.remaining_new_tokens, 1 << 20) * new_token_ratio)
        need = extend_len + future if take == extend_len else take
        if take == 0 or not cache.admit(req):
            passed_over.append(req)
            continue
        # Checked after locking: the lock takes the matched prefix out of `evictable`.
        nothing_else_runs = num_running == 0 and not reqs
        available = cache.available_tokens - reserved_tokens
        if not (need <= available or (nothing_else_runs and take <= available)):
            cache.unadmit(req)
            # Memory is the limit: admitting later requests would reorder the queue, so stop here.
            passed_over.extend(ordered[ordered.index(req) :])
            break
        cache.commit_admission(req)
        reqs.append(req)
        take_lens.append(take)
        budget -= take
        reserved_tokens += take + future
        admitted_prompts.append(fill)
    for req in ordered:
        if hasattr(req, "_match") and req not in reqs:
            del req._match  # stale once this step changes the cache
    if not reqs:
        return None
    for req in passed_over:
        req.times_passed_over += 1
    return PrefillPlan(reqs, take_lens)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
