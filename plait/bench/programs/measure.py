"""How the suite sees a backend: the programs run on a `MeasuredBackend` that wraps the backend
under test, decodes greedily, fixes output lengths, and counts every frontend call; a meter
reads the engine's own token counters before and after a run.
"""

from __future__ import annotations

import threading
import urllib.request
from collections import Counter
from typing import Any, Callable, Iterator, NamedTuple

from plait.lang.backend.base import BaseBackend
from plait.lang.params import GenParams


class MeasuredBackend(BaseBackend):
    """Delegates to `inner`. With `exact_lengths`, an unconstrained gen drops its stop strings and
    ignores EOS, so it generates exactly `max_tokens` on every engine and two engines do the same
    work whatever text they produce (constrained gens keep their natural length: the grammar ends
    them). Decoding is greedy. `counts` adds up gens, selects, forks (and their branches), the
    cache hints the inner backend acts on, and programs (sub-programs included)."""

    def __init__(self, inner: BaseBackend, *, exact_lengths: bool = True):
        super().__init__()
        self.inner = inner
        self.exact_lengths = exact_lengths
        self.chat_template = inner.get_chat_template()
        self.is_chat_model = inner.is_chat_model
        self.support_concate_and_append = inner.support_concate_and_append
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        # A hint counts only where the backend sends it (the OpenAI backend ignores hints).
        self._hints_sent = type(inner).commit_lazy_operations is not BaseBackend.commit_lazy_operations

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def take_counts(self) -> Counter:
        """The counts since the last call (and start over)."""
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def policy(self, params: GenParams) -> GenParams:
        sp = params.sampling
        constrained = params.dtype is not None or any(
            v is not None for v in (sp.regex, sp.json_schema, sp.ebnf, sp.structural_tag))
        if not self.exact_lengths or constrained:
            return params.replace(temperature=0.0)
        return params.replace(temperature=0.0, stop=[], stop_token_ids=[], stop_regex=[], ignore_eos=True,
                              min_new_tokens=sp.max_new_tokens)

    # ---- counted calls --------------------------------------------------------------------------
    def generate(self, s: Any, sampling_params: GenParams) -> tuple[Any, Any]:
        self._count("gens")
        return self.inner.generate(s, self.policy(sampling_params))

    def generate_stream(self, s: Any, sampling_params: GenParams) -> Iterator[tuple[str, dict]]:
        self._count("gens")
        return self.inner.generate_stream(s, self.policy(sampling_params))

    def select(self, s: Any, choices: list[str], temperature: float, choices_method: Any) -> Any:
        self._count("selects")
        return self.inner.select(s, choices, temperature, choices_method)

    def fork_program(self, src: Any, dst_rids: list[str], position_ids_offset: Any = None) -> None:
        self._count("forks")
        self._count("branches", len(dst_rids))
        self.inner.fork_program(src, dst_rids, position_ids_offset)

    def cache_prefix(self, prefix_str: str) -> None:
        self._count("hints", self._hints_sent)
        self.inner.cache_prefix(prefix_str)

    def commit_lazy_operations(self, s: Any) -> None:
        self._count("hints", self._hints_sent)
        self.inner.commit_lazy_operations(s)

    def begin_program(self, s: Any) -> None:
        self._count("programs")
        self.inner.begin_program(s)

    # ---- passed through -------------------------------------------------------------------------
    def end_program(self, s: Any) -> None:
        self.inner.end_program(s)

    def fill_image(self, s: Any) -> None:
        self.inner.fill_image(s)

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        self.inner.concatenate_and_append(src_rids, dst_rid)

    def get_model_name(self) -> str:
        return self.inner.get_model_name()

    def flush_cache(self) -> Any:
        return self.inner.flush_cache()

    def get_server_info(self) -> Any:
        return self.inner.get_server_info()


class Usage(NamedTuple):
    """Token counts of one run, as the engine reports them (None: the engine does not say)."""

    prompt_tokens: int | None
    cached_tokens: int | None
    output_tokens: int | None
    forced_tokens: int | None = None  # appended by jump-forward without decoding (Plait)

    @property
    def hit_rate(self) -> float | None:
        if self.prompt_tokens and self.cached_tokens is not None:
            return self.cached_tokens / self.prompt_tokens
        return None

    @property
    def computed_prompt_tokens(self) -> int | None:
        if self.prompt_tokens is None or self.cached_tokens is None:
            return None
        return self.prompt_tokens - self.cached_tokens


Meter = Callable[[], dict[str, float]]


def plait_meter(server_info: Callable[[], dict[str, Any]]) -> Meter:
    """Plait's counters (the engine's or `/get_server_info`'s): prompt tokens admitted, of them
    cached, tokens generated, tokens forced by jump-forward."""

    def read() -> dict[str, float]:
        state = server_info()["internal_states"][0]
        return {"prompt_tokens": state["cache"]["prompt_tokens_total"],
                "cached_tokens": state["cache"]["cached_tokens_total"],
                "output_tokens": state["scheduler"]["generated_tokens"],
                "forced_tokens": state["grammar"].get("jump_forced_tokens", 0)}

    return read


def openai_meter(backend: Any, metrics_url: str | None) -> Meter:
    """The OpenAI backend's usage sums, and vLLM's prefix-cache counters from `/metrics` (vLLM does
    not put cached tokens in its usage unless started with --enable-prompt-tokens-details)."""

    def read() -> dict[str, float]:
        usage = backend.token_usage
        out: dict[str, float] = {"prompt_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}
        if usage.cached_tokens is not None:
            out["cached_tokens"] = usage.cached_tokens
        elif metrics_url:
            hits = vllm_prefix_cache_hits(metrics_url)
            if hits is not None:
                out["cached_tokens"] = hits
        return out

    return read


def vllm_prefix_cache_hits(metrics_url: str) -> float | None:
    try:
        with urllib.request.urlopen(metrics_url, timeout=30) as resp:
            text = resp.read().decode(errors="replace")
    except OSError:
        return None
    hits = [float(line.rsplit(" ", 1)[-1]) for line in text.splitlines()
            if line.startswith("vllm:prefix_cache_hits_total")]
    return sum(hits) if hits else None


def usage_between(before: dict[str, float], after: dict[str, float]) -> Usage:
    def delta(key: str) -> int | None:
        if key not in before or key not in after:
            return None
        return int(after[key] - before[key])

    return Usage(delta("prompt_tokens"), delta("cached_tokens"), delta("output_tokens"), delta("forced_tokens"))
