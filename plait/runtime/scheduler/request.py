"""A request as the scheduler sees it: token ids, counters over the KV it holds, and its output so far."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from plait.runtime.frontend.messages import GenerateRequest

if TYPE_CHECKING:
    from concurrent.futures import Future

    from plait.runtime.cache.base import MatchResult, TreeNode
    from plait.runtime.cache.tiers import LoadJob
    from plait.runtime.constrained.base import CompiledGrammar, GrammarMatcher
    from plait.runtime.detokenizer import IncrementalDetokenizer


class Req:
    """Counters (all in tokens):

    - `fill_ids = prompt + output`; `kv_committed_len` of them have KV in the pool, through
      `req_to_token[req_pool_idx, :kv_committed_len]`. Between steps, a decoding request has
      `kv_committed_len == len(fill_ids) - 1`: its last sampled token has not run yet.
    - `prefix_len`: what the cache gave at admission (reported as `cached_tokens`).
    - `cache_protected_len`: the first slots of the row that belong to the cache (locked through
      `last_node`); the rest are the request's own.
    - `inflight`: tokens sampled on the device but not yet read back (overlap scheduling: 0 or 1).
      Such a token is already the input of the next decode step, so then `kv_committed_len` can be
      `len(fill_ids)` or, until the token is appended, `len(fill_ids) + 1`.
    """

    # Every field is declared here; nothing else may attach state to a request.
    __slots__ = (
        "msg", "rid", "params", "prompt_ids", "output_ids", "eos_token_ids", "arrival_time", "first_token_time",
        "req_pool_idx", "kv_committed_len", "prefix_len", "cached_tokens", "cache_protected_len", "last_node",
        "pending_match", "pending_load", "inflight", "times_passed_over", "num_retractions", "admitted_once", "grammar_future",
        "matcher", "finish_reason", "detokenizer", "pending", "input_logprobs_done",
    )

    def __init__(self, msg: GenerateRequest, *, eos_token_ids: list[int]):
        self.msg = msg
        self.rid = msg.rid
        self.params = msg.sampling_params
        self.prompt_ids: list[int] = list(msg.input_ids)
        self.output_ids: list[int] = []
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        # KV bookkeeping
        self.req_pool_idx: int | None = None
        self.kv_committed_len = 0
        self.prefix_len = 0
        self.cached_tokens = 0  # reported prefix hit of the first admission
        self.cache_protected_len = 0
        self.last_node: TreeNode | None = None
        self.pending_match: MatchResult | None = None  # looked up by the admission round, until admitted
        self.pending_load: LoadJob | None = None  # its prefix coming back from a lower cache tier
        # scheduling
        self.inflight = 0
        self.times_passed_over = 0  # admission rounds in which others were admitted but not this one
        self.num_retractions = 0
        self.admitted_once = False
        # constrained decoding: the grammar compiling, then the request's position in it
        self.grammar_future: Future[CompiledGrammar] | None = None
        self.matcher: GrammarMatcher | None = None
        # outputs
        self.finish_reason: dict[str, Any] | None = None
        self.detokenizer: IncrementalDetokenizer | None = None
        self.pending = _PendingOutput()
        self.input_logprobs_done = msg.logprob_start_len < 0 or not msg.return_logprob

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens if self.params.max_new_tokens is not None else 1 << 30

    @property
    def remaining_new_tokens(self) -> int:
        """Tokens it may still generate, counting those in flight."""
        return max(0, self.max_new_tokens - len(self.output_ids) - self.inflight)

    def match_limit(self) -> int:
        """How many leading tokens may come from the cache: at least one token must be computed
        (for logits), and prompt logprobs need the logits of every position from logprob_start_len - 1."""
        limit = self.seq_len - 1
        if not self.input_logprobs_done:
            limit = min(limit, max(self.msg.logprob_start_len - 1, 0))
        return max(limit, 0)

    def reset_kv(self) -> None:
        """Forget all KV state (after retraction: the request will be prefilled again)."""
        self.req_pool_idx = None
        self.kv_committed_len = 0
        self.prefix_len = 0
        self.cache_protected_len = 0
        self.last_node = None

    def __repr__(self) -> str:
        return f"Req({self.rid}, prompt={len(self.prompt_ids)}, out={len(self.output_ids)}, kv={self.kv_committed_len})"


class _PendingOutput:
    """Output produced since the last message to the front end."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.text = ""
        self.output_ids: list[int] = []
        self.num_dropped_ids = 0  # jump-forward retokenized this many already-sent output ids
        self.input_token_logprobs: list = []
        self.input_top_logprobs: list = []
        self.input_token_ids_logprobs: list = []
        self.output_token_logprobs: list = []
        self.output_top_logprobs: list = []
        self.output_token_ids_logprobs: list = []
