"""Every message between the front end and the scheduler, both directions, one small dataclass per kind.

The same objects travel over either transport: put on a queue for the in-process `Engine`, or
pickled over ZMQ between the HTTP process and the scheduler process. Nothing else crosses.

    front end -> scheduler: GenerateRequest, AbortRequest, WorkflowUpdate, FlushCacheQuery, InfoQuery, Shutdown
    scheduler -> front end: OutputBatch (of RequestOutput), QueryReply, SchedulerReady,
                            SchedulerStats, SchedulerFailed

Queries carry a `query_id` that their reply repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from plait.sampling_params import SamplingParams

# Status codes a request can finish with when it did not finish normally (`finish_reason.status_code`).
STATUS_BAD_REQUEST = 400
STATUS_CLIENT_ABORT = 499  # the client aborted it or went away: not an error
STATUS_INTERNAL_ERROR = 500
STATUS_UNAVAILABLE = 503  # the server is shutting down


# ---- front end -> scheduler ---------------------------------------------------------------------------
@dataclass
class GenerateRequest:
    """One sequence to generate (a batch or `n > 1` is expanded by the front end into several)."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only; k >= 0: also prompt tokens from position k
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False  # send outputs as they are produced, not only the last one
    workflow_id: str | None = None  # the agent workflow the request belongs to (cache eviction and prefetch)
    agent: str | None = None  # the agent of that workflow it runs


@dataclass
class AbortRequest:
    """Abort the request with exactly this rid ("" aborts every request); it finishes with
    `finish_reason = {"type": "abort", "message": message, "status_code": status_code}`."""

    rid: str
    message: str = "aborted by the client"
    status_code: int = STATUS_CLIENT_ABORT


@dataclass
class WorkflowUpdate:
    """Publish (or replace) an agent workflow's step graph: `steps` is a list of
    `{"id": str, "agents": [str], "next": [step ids]}`; `current_step` optionally says where it is."""

    workflow_id: str
    steps: list[dict[str, Any]]
    current_step: str | None = None


@dataclass
class FlushCacheQuery:
    """Drop the prefix cache and compiled grammars if no request is running; replies True/False."""

    query_id: int


@dataclass
class InfoQuery:
    """Ask for the scheduler's `InternalState` (taken between two steps, where the invariants hold)."""

    query_id: int


@dataclass
class Shutdown:
    """Abort everything (status 503) and stop the driver loop."""


ToScheduler = Union[GenerateRequest, AbortRequest, WorkflowUpdate, FlushCacheQuery, InfoQuery, Shutdown]


# ---- scheduler -> front end ---------------------------------------------------------------------------
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


@dataclass
class OutputBatch:
    """The outputs of one scheduler step (or of a reject or an abort)."""

    outputs: list[RequestOutput]


@dataclass
class QueryReply:
    query_id: int
    result: Any  # InfoQuery: an InternalState; FlushCacheQuery: bool


@dataclass
class SchedulerReady:
    """The model is loaded: everything the front end needs to tokenize, validate and describe it."""

    tokenizer: Any  # plait.runtime.tokenizer.Tokenizer, or None for a model without one
    model_path: str
    tokenizer_path: str | None
    limits: Any  # plait.runtime.frontend.validate.Limits
    max_running_requests: int
    default_sampling: dict[str, Any]  # from the model's generation_config
    server_args: dict[str, Any] = field(default_factory=dict)  # the resolved runtime configuration
    info: dict[str, Any] = field(default_factory=dict)  # static facts for /get_server_info


@dataclass
class SchedulerStats:
    """Sent periodically while busy, and once when the scheduler becomes idle."""

    num_running: int
    num_waiting: int
    token_usage: float  # share of KV slots held by requests or locked in the cache
    cache_hit_rate: float  # cumulative, over admitted prompt tokens
    gen_throughput: float  # generated tokens per second since the previous stats message
    hicache: dict[str, int] = field(default_factory=dict)  # the tiered cache's cumulative counters
    # A data-parallel server: each replica's own stats, in replica order (the fields above sum them).
    replicas: list["SchedulerStats"] = field(default_factory=list)


@dataclass
class SchedulerFailed:
    """The scheduler could not start, crashed or died; nothing more will come from it."""

    message: str


FromScheduler = Union[OutputBatch, QueryReply, SchedulerReady, SchedulerStats, SchedulerFailed]
