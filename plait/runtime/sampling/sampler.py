"""Batched sampling: per-row parameters as tensors, one pipeline for the whole batch.

Pipeline (design notes 7.2), every row with its own parameters:
  logits (float32) -> logit_bias -> penalties -> min_new_tokens mask -> grammar vocab mask
  -> greedy rows: argmax
  -> sampled rows: softmax(logits / T) -> top-k -> top-p -> min-p -> exponential race.

Sampling is the exponential race (`argmax(probs / E)`, E ~ Exp(1) i.i.d.), which draws exactly from
`probs` up to scale, so truncated probabilities need no renormalisation, and it needs one random
number per (row, token). That makes per-request seeds simple: a seeded row's numbers come from a
generator seeded by (seed, tokens generated so far), so its draw does not depend on which requests
share the batch or where the row sits in it.

Logprobs in `SampleOutput` describe the *raw* model distribution (log_softmax of the logits before
penalties, bias, temperature and truncation): the greedy token is the top-1, and prompt and output
logprobs are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from plait.runtime.sampling.logprobs import token_logprobs
from plait.runtime.sampling.penalties import PenaltyState, apply_penalties
from plait.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


class SparseLogits(NamedTuple):
    """Entries (rows[i], cols[i]) of a [bs, vocab] logits tensor with a value each."""

    rows: torch.Tensor  # [n] int64
    cols: torch.Tensor  # [n] int64
    values: torch.Tensor  # [n] float32


@dataclass
class SamplingBatchInfo:
    """Per-batch sampling tensors built once from the requests' params (rows = requests)."""

    vocab_size: int
    # The sampled rows' settings; None when every row is greedy (nothing reads them then, and building
    # five small tensors per step is a measurable share of a small model's token on a CPU).
    temperatures: torch.Tensor | None  # [bs, 1] float32; 1.0 on greedy rows (never divided by 0)
    top_ps: torch.Tensor | None  # [bs] float32
    top_ks: torch.Tensor | None  # [bs] int64; disabled = vocab_size
    min_ps: torch.Tensor | None  # [bs] float32
    greedy_rows: torch.Tensor | None  # [bs] bool
    # Flags over the sampled (non-greedy) rows only, so the batch skips stages nobody uses.
    is_all_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    logit_bias: SparseLogits | None  # added to the logits
    penalties: PenaltyState | None
    min_tokens_mask: SparseLogits | None  # set to -inf: stop ids of rows still under min_new_tokens
    seeds: list[int | None]
    step_offsets: list[int]  # tokens generated so far per row; with the seed, picks the row's random stream

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        *,
        vocab_size: int,
        device: torch.device | str,
        output_ids: list[list[int]],
        prompt_ids: list[list[int]],
        step_offsets: list[int] | None = None,
        stop_token_ids_for_min: list[list[int]] | None = None,
    ) -> SamplingBatchInfo:
        """Build the batch's sampling state.

        `output_ids`: tokens generated so far per request (frequency/presence count these;
        min_new_tokens compares against their number). `prompt_ids`: repetition penalty counts
        prompt tokens too. `step_offsets`: tokens generated so far, for seeded rows (defaults to
        `len(output_ids[i])`). `stop_token_ids_for_min`: ids to mask while a request is under
        min_new_tokens; the caller passes eos (unless ignore_eos) + stop_token_ids; when None,
        each request's own `stop_token_ids` are used.
        """
        bs = len(params)
        assert len(output_ids) == bs and len(prompt_ids) == bs
        if step_offsets is None:
            step_offsets = [len(out) for out in output_ids]
        assert len(step_offsets) == bs and all(s >= 0 for s in step_offsets)
        if stop_token_ids_for_min is None:
            stop_token_ids_for_min = [p.stop_token_ids for p in params]
        assert len(stop_token_ids_for_min) == bs
        device = torch.device(device)

        greedy = [p.is_greedy for p in params]
        top_ks = [vocab_size if p.top_k < 1 else min(p.top_k, vocab_size) for p in params]
        sampled = [i for i in range(bs) if not greedy[i]]

        bias_entries = [(i, t, v) for i, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
        min_entries = [
            (i, t, float("-inf"))
            for i, p in enumerate(params)
            if len(output_ids[i]) < p.min_new_tokens
            for t in stop_token_ids_for_min[i]
        ]
        rows: dict[str, torch.Tensor | None] = dict.fromkeys(("temperatures", "top_ps", "top_ks", "min_ps", "greedy_rows"))
        if sampled:
            rows.update(
                temperatures=_to_device(
                    [1.0 if g else float(p.temperature) for g, p in zip(greedy, params)], torch.float32, device
                ).unsqueeze(1),
                top_ps=_to_device([float(p.top_p) for p in params], torch.float32, device),
                top_ks=_to_device(top_ks, torch.int64, device),
                min_ps=_to_device([float(p.min_p) for p in params], torch.float32, device),
                greedy_rows=_to_device(greedy, torch.bool, device),
            )
        return cls(
            vocab_size=vocab_size,
            **rows,
            is_all_greedy=not sampled,
            need_top_k=any(top_ks[i] < vocab_size for i in sampled),
            need_top_p=any(params[i].top_p < 1 for i in sampled),
            need_min_p=any(params[i].min_p > 0 for i in sampled),
            logit_bias=_sparse(bias_entries, vocab_size, device),
            penalties=PenaltyState.build(
                params, output_ids=output_ids, prompt_ids=prompt_ids, vocab_size=vocab_size, device=device
            ),
            min_tokens_mask=_sparse(min_entries, vocab_size, device),
            seeds=[p.seed for p in params],
            step_offsets=list(step_offsets),
        )


@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # [bs] int64
    logprobs: torch.Tensor  # [bs] float32: chosen token under the raw model distribution


def process_logits(
    logits: torch.Tensor, info: SamplingBatchInfo, *, vocab_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """logits [bs, vocab] -> float32 logits after bias, penalties, min_new_tokens and the grammar mask.

    `vocab_mask` is a bool [bs, vocab] of *allowed* tokens. The input is never modified.
    """
    assert logits.shape == (info.batch_size, info.vocab_size), (tuple(logits.shape), info.vocab_size)
    # A copy only where it is written in place below (49k float32 logits take ~0.3 ms to copy on a
    # 2-core CPU, 2% of a small model's token).
    x = logits.to(torch.float32, copy=info.logit_bias is not None or info.min_tokens_mask is not None)
    if info.logit_bias is not None:
        b = info.logit_bias
        x.index_put_((b.rows, b.cols), b.values, accumulate=True)
    x = apply_penalties(x, info.penalties)
    if info.min_tokens_mask is not None:
        m = info.min_tokens_mask
        x.index_put_((m.rows, m.cols), m.values)
    if vocab_mask is not None:
        assert vocab_mask.shape == x.shape and vocab_mask.dtype == torch.bool
        x = x.masked_fill(~vocab_mask, float("-inf"))
    return x


def filter_probs(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """probs [bs, vocab] -> the same with tokens outside top-k / top-p / min-p set to 0 (not renormalised).

    Applied in sequence: top-p acts on the top-k-renormalised distribution and keeps the smallest
    prefix whose mass reaches top_p (a token survives when the mass *before* it is < top_p, so the
    top token always does); min-p drops tokens below `min_p * max prob`, which truncation before
    it does not change relatively.
    """
    if info.need_top_k or info.need_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [bs, vocab]
        if info.need_top_k:
            ranks = torch.arange(probs.shape[1], device=probs.device)
            sorted_probs = sorted_probs.masked_fill(ranks.unsqueeze(0) >= info.top_ks.unsqueeze(1), 0.0)
        if info.need_top_p:
            cum = sorted_probs.cumsum(dim=-1)  # [bs, vocab]
            mass_before = (cum - sorted_probs) / cum[:, -1:]
            top_ps = info.top_ps.unsqueeze(1)
            # Rows with top_p == 1 keep everything even if rounding pushes mass_before past 1.
            sorted_probs = sorted_probs.masked_fill((mass_before >= top_ps) & (top_ps < 1), 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    if info.need_min_p:
        threshold = probs.amax(dim=-1, keepdim=True) * info.min_ps.unsqueeze(1)  # [bs, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def row_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed for one (request seed, step): nearby pairs give unrelated streams."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim. On the CPU through NumPy: torch's takes ~90 us for one row of a
    49k vocabulary (its parallel reduction), NumPy's ~11 us; both pick the first of equal maxima and a
    NaN if there is one."""
    if x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return torch.from_numpy(x.numpy().argmax(axis=-1).astype("int64", copy=False))
    return x.argmax(dim=-1)


class Sampler:
    """Turns a batch's last-position logits into next tokens; holds only a reusable RNG per device."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self, logits: torch.Tensor, info: SamplingBatchInfo, *, vocab_mask: torch.Tensor | None = None,
        need_logprobs: bool = True,
    ) -> SampleOutput:
        """logits [bs, vocab] (any float dtype) -> next token ids and their raw-distribution logprobs
        (zeros when `need_logprobs` is false: a log-sum-exp over the vocabulary per row saved)."""
        processed = process_logits(logits, info, vocab_mask=vocab_mask)  # [bs, vocab] float32
        next_token_ids = _argmax_rows(processed)  # [bs]
        if not info.is_all_greedy:
            sampled = self._sample(processed, info)
            next_token_ids = torch.where(info.greedy_rows, next_token_ids, sampled)
        if not need_logprobs:
            return SampleOutput(next_token_ids, torch.zeros(next_token_ids.shape, device=logits.device))
        return SampleOutput(next_token_ids, token_logprobs(logits, next_token_ids))

    def _sample(self, processed: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        probs = torch.softmax(processed / info.temperatures, dim=-1)  # [bs, vocab]
        probs = filter_probs(probs, info)
        race = self._exponentials(probs, info)  # [bs, vocab]
        sampled = (probs / race).argmax(dim=-1)
        # Rows whose distribution broke (NaN/inf logits, everything masked) fall back to argmax.
        valid = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        return torch.where(valid, sampled, processed.argmax(dim=-1))

    def _exponentials(self, probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """Exp(1) draws [bs, vocab]: the global RNG for unseeded rows, a per-(seed, step) stream otherwise."""
        race = torch.empty_like(probs).exponential_()
        seeded = [i for i, s in enumerate(info.seeds) if s is not None]
        if seeded:
            gen = self._generator(probs.device)
            vocab = probs.shape[1]
            for i in seeded:
                gen.manual_seed(row_seed(info.seeds[i], info.step_offsets[i]))
                race[i] = torch.empty(vocab, dtype=probs.dtype, device=probs.device).exponential_(generator=gen)
        # A draw of exactly 0 would turn a zero-probability token into 0/0 = NaN, which argmax picks.
        return race.clamp_(min=torch.finfo(probs.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


def _sparse(entries: list[tuple[int, int, float]], vocab_size: int, device: torch.device) -> SparseLogits | None:
    if not entries:
        return None
    rows, cols, values = zip(*entries)
    assert all(0 <= c < vocab_size for c in cols), "token id outside the vocabulary"
    return SparseLogits(
        rows=_to_device(rows, torch.int64, device),
        cols=_to_device(cols, torch.int64, device),
        values=_to_device(values, torch.float32, device),
    )


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor on the device without waiting for work queued there (`torch.tensor(..., device=cuda)`
    would wait for it, which defeats overlap scheduling)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
