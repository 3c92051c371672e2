"""The scheduler's grammar manager: compiles off-thread with a bounded cache, builds batch masks.

Compiling a large JSON schema takes tens of milliseconds to seconds, far longer than a decode step,
so it never runs on the scheduler thread: `request` returns a `Future` at once (already done on a
cache hit) and the scheduler keeps the request in a grammar queue until `future.done()`. The cache
holds futures, not results, so requests that arrive while the same spec is still compiling share
that one compile. Failed compiles stay cached too: a repeated bad spec fails at once.

The backend itself (tokenizer tables: ~0.5 s for a 49k vocabulary) is built on the worker pool as
the manager starts, so neither startup nor the scheduler thread waits for it.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from plait.runtime.constrained.base import (
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    GrammarKey,
    GrammarMatcher,
    backend_class,
    grammar_key,
)
from plait.sampling_params import SamplingParams

BITS_PER_WORD = 32


class GrammarManager:
    """Owned by the scheduler: `request`, `new_matcher` and `batch_mask` are called from its thread
    only; compiles (and building the backend) run on `max_workers` worker threads."""

    def __init__(
        self,
        backend_name: str,
        tokenizer: Any,
        vocab_size: int,
        *,
        max_workers: int = 1,
        cache_size: int = 256,
        compile_threads: int = 1,
        stop_token_ids: list[int] | None = None,
    ):
        """`vocab_size`: the model's logits width. `compile_threads`: threads inside one compile
        (xgrammar's token-mask precompute) and for batch mask filling; `max_workers`: compiles that
        run at once."""
        assert cache_size >= 1 and max_workers >= 1
        cls = backend_class(backend_name)  # an unknown or missing backend fails here, at startup
        self.backend_name = backend_name
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar")
        self._backend: Future[GrammarBackend] = self._executor.submit(
            cls, tokenizer, vocab_size, stop_token_ids=stop_token_ids, num_threads=compile_threads
        )
        self._cache: OrderedDict[GrammarKey, Future[CompiledGrammar]] = OrderedDict()
        self.stats = {"hits": 0, "misses": 0}

    @property
    def backend(self) -> GrammarBackend:
        """Blocks until the backend is built (done before any compile finishes)."""
        return self._backend.result()

    # ---- compiling -------------------------------------------------------------------------------------
    def request(self, key: GrammarKey | SamplingParams) -> Future[CompiledGrammar] | None:
        """The compiled grammar for a key (or a request's params; None if unconstrained).

        Never blocks. The future raises GrammarError for an invalid spec. Call from one thread
        (the scheduler's): the cache itself takes no lock."""
        if isinstance(key, SamplingParams):
            key = grammar_key(key)
            if key is None:
                return None
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            self.stats["hits"] += 1
            return future
        self.stats["misses"] += 1
        future = self._executor.submit(self._compile, key)
        self._cache[key] = future
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # an evicted compile still completes for its waiters
        return future

    def _compile(self, key: GrammarKey) -> CompiledGrammar:
        backend = self._backend.result()
        compiled = backend.compile(key)
        probe(backend, compiled)
        return compiled

    def new_matcher(self, compiled: CompiledGrammar) -> GrammarMatcher:
        return self.backend.new_matcher(compiled)

    def clear_cache(self) -> None:
        """Forget compiled grammars (flush_cache). Matchers already made keep working."""
        self._cache.clear()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- masks ---------------------------------------------------------------------------------------------
    def batch_mask(
        self, matchers: Sequence[GrammarMatcher | None], *, device: torch.device | str
    ) -> torch.Tensor | None:
        """bool [bs, vocab_size] of allowed next tokens on `device`, one row per request in batch
        order (None = unconstrained: an all-True row). Returns None when no row is constrained, so
        unconstrained batches pay nothing. Only the packed bitmask (1/32 of the bool size) crosses
        to the device; it is unpacked there."""
        rows = [(i, m) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        bitmask = self.batch_bitmask(matchers, rows=rows)
        return unpack_bitmask(bitmask.to(device, non_blocking=True), self.vocab_size)

    def batch_bitmask(
        self, matchers: Sequence[GrammarMatcher | None], *, rows: list[tuple[int, GrammarMatcher]] | None = None
    ) -> torch.Tensor:
        """int32 [bs, ceil(vocab_size / 32)] packed mask on the CPU (all bits set on unconstrained rows),
        for a sampler that applies packed masks itself."""
        if rows is None:
            rows = [(i, m) for i, m in enumerate(matchers) if m is not None]
        bitmask = torch.full((len(matchers), bitmask_width(self.vocab_size)), -1, dtype=torch.int32)
        self.backend.fill_bitmasks(rows, bitmask)
        return bitmask


PROBE_STEPS = 8


def probe(backend: GrammarBackend, compiled: CompiledGrammar, *, steps: int = PROBE_STEPS) -> None:
    """Follow the grammar for its first few tokens (always the lowest allowed id) on a throwaway
    matcher; raise GrammarError if it allows only an empty output or if the engine gives up.

    Engines build their automata lazily: a regex like `(c{1000}){1000}` compiles, then exceeds the
    engine's size limits at its first token. Found here, on the compile worker, it is refused
    like a syntax error (HTTP 400) before the request generates anything."""
    kind = compiled.key.kind
    matcher = backend.new_matcher(compiled)
    bitmask = torch.empty((1, bitmask_width(backend.vocab_size)), dtype=torch.int32)
    stops = set(backend.stop_token_ids)
    for step in range(steps):
        bitmask.fill_(-1)
        matcher.fill_bitmask(bitmask, 0)
        allowed = unpack_bitmask(bitmask, backend.vocab_size)[0].nonzero().flatten().tolist()
        token = next((t for t in allowed if t not in stops), None)
        if token is None:
            if step == 0 and not allowed:
                raise GrammarError(f"invalid {kind}: it allows no output at all")
            if step == 0:
                raise GrammarError(f"invalid {kind}: it allows only an empty output")
            return
        if not matcher.accept_token(token):
            reason = matcher.error() or "the grammar engine refused a token it allowed"
            raise GrammarError(f"invalid {kind}: the grammar engine cannot follow it ({reason})")


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [bs, words] (bit j % 32 of word j // 32 = token j) -> bool [bs, vocab_size], same device."""
    if bitmask.device.type == "cpu":
        # numpy's unpackbits is one single-threaded pass: on a CPU it beats the torch ops below by far,
        # since tiny multi-threaded kernels stall whenever the cores are busy.
        return _unpack_numpy(bitmask, vocab_size)
    return _unpack_torch(bitmask, vocab_size)


def _unpack_numpy(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    assert sys.byteorder == "little"  # word bit k is then bit k % 8 of byte k // 8
    words = bitmask.contiguous().numpy()
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")  # [bs, words * 32]
    return torch.from_numpy(bits[:, :vocab_size].astype(bool))


def _unpack_torch(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [bs, words, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
