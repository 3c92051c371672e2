"""Typed messages between the front end (Engine or HTTP server) and the scheduler, one per kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plait.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only; k >= 0: also prompt tokens from position k
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False


@dataclass
class AbortRequest:
    rid: str  # "" aborts everything


@dataclass
class FlushCacheRequest:
    pass


@dataclass
class RequestOutput:
    """What a request produced since its previous output (the front end accumulates).

    Logprob entries are `(logprob, token_id)` pairs (logprob None for the very first prompt token);
    the front end adds token text when asked.
    """

    rid: str
    new_text: str
    new_output_ids: list[int]
    finished: bool
    num_dropped_ids: int = 0  # drop this many previously sent output ids before adding the new ones
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    num_retractions: int = 0
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_token_ids_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_token_ids_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
