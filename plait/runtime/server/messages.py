"""Messages between the HTTP process and the scheduler process, beyond the scheduler's own
(`GenerateRequest`, `AbortRequest`, `RequestOutput` in `plait.runtime.scheduler.io`).

Both directions are ZMQ PUSH/PULL sockets carrying pickled objects: the HTTP process sends a
message at a time; the scheduler process sends a `list[RequestOutput]` per step, or one of the
messages below. Queries carry a `query_id` that their reply repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SchedulerReady:
    """The model is loaded; everything the HTTP process needs to validate and tokenize."""

    tokenizer: Any  # plait.runtime.tokenizer.Tokenizer, or None for a model without one
    model_path: str
    tokenizer_path: str | None
    context_length: int
    vocab_size: int
    max_total_tokens: int  # KV pool size in tokens
    max_running_requests: int
    default_sampling: dict[str, Any]  # from the model's generation_config
    info: dict[str, Any] = field(default_factory=dict)  # static facts for /get_server_info


@dataclass
class SchedulerFailed:
    """The scheduler process could not start or crashed; it exits right after sending this."""

    message: str


@dataclass
class SchedulerStats:
    """Sent periodically while busy, and once when the scheduler becomes idle."""

    num_running: int
    num_waiting: int
    token_usage: float  # share of KV slots held by requests or locked in the cache
    cache_hit_rate: float  # cumulative, over admitted prompt tokens
    gen_throughput: float  # generated tokens per second since the previous stats message


@dataclass
class InfoQuery:
    """Ask for the scheduler's state, with a cache integrity check run between two steps."""

    query_id: int


@dataclass
class FlushCacheQuery:
    query_id: int


@dataclass
class QueryReply:
    query_id: int
    result: Any


@dataclass
class Shutdown:
    """Abort everything and exit."""
