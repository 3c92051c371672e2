"""History-dependent penalties: frequency and presence (output tokens), repetition (prompt + output).

The state is dense (`[bs, vocab]` per penalty, about 150 MB at bs 256 with a 150k vocab), so it is
built only for the penalties some request in the batch uses, and only rows that use a penalty
contribute tokens to it.

Definitions (OpenAI for frequency/presence, CTRL/SGLang/vLLM for repetition):
  - frequency: `logit -= count * frequency_penalty`, `count` = occurrences in the output so far;
  - presence:  `logit -= presence_penalty` once for any token already in the output;
  - repetition: for any token seen in the prompt or the output,
    `logit = logit / p if logit > 0 else logit * p` (p > 1 discourages repeats).
Repetition is applied first, to the raw logit whose sign it tests; then frequency and presence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.sampling_params import SamplingParams


@dataclass
class PenaltyState:
    # Frequency/presence; None when no row of the batch uses either.
    output_counts: torch.Tensor | None  # [bs, vocab] float32: occurrences in the output
    frequency_penalties: torch.Tensor | None  # [bs, 1] float32
    presence_penalties: torch.Tensor | None  # [bs, 1] float32
    # Repetition; None when every row has repetition_penalty 1.
    seen: torch.Tensor | None  # [bs, vocab] bool: token occurs in the prompt or the output
    repetition_penalties: torch.Tensor | None  # [bs, 1] float32

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        *,
        output_ids: list[list[int]],
        prompt_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> PenaltyState | None:
        """Return the penalty state of a batch, or None when no request uses a penalty."""
        bs = len(params)
        assert len(output_ids) == bs and len(prompt_ids) == bs
        count_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0]
        seen_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1]
        if not count_rows and not seen_rows:
            return None
        state = cls(None, None, None, None, None)
        if count_rows:
            rows, cols = _flatten({i: output_ids[i] for i in count_rows}, vocab_size)
            counts = torch.zeros(bs, vocab_size, dtype=torch.float32)
            counts.index_put_((rows, cols), torch.ones(rows.shape[0]), accumulate=True)
            state.output_counts = counts.to(device, non_blocking=True)
            state.frequency_penalties = _column([p.frequency_penalty for p in params], device)
            state.presence_penalties = _column([p.presence_penalty for p in params], device)
        if seen_rows:
            rows, cols = _flatten({i: list(prompt_ids[i]) + list(output_ids[i]) for i in seen_rows}, vocab_size)
            seen = torch.zeros(bs, vocab_size, dtype=torch.bool)
            seen[rows, cols] = True
            state.seen = seen.to(device, non_blocking=True)
            state.repetition_penalties = _column([p.repetition_penalty for p in params], device)
        return state


def apply_penalties(logits: torch.Tensor, state: PenaltyState | None) -> torch.Tensor:
    """Return `logits` ([bs, vocab] float32) with the penalties applied; the input is not modified."""
    if state is None:
        return logits
    if state.seen is not None:
        rep = state.repetition_penalties  # [bs, 1]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(state.seen, penalized, logits)
    if state.output_counts is not None:
        counts = state.output_counts  # [bs, vocab]
        logits = logits - counts * state.frequency_penalties - (counts > 0) * state.presence_penalties
    return logits


def _flatten(ids_by_row: dict[int, list[int]], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs of every token of every listed row, as two int64 tensors on the CPU."""
    rows: list[int] = []
    cols: list[int] = []
    for row, ids in ids_by_row.items():
        rows.extend([row] * len(ids))
        cols.extend(ids)
    cols_t = torch.tensor(cols, dtype=torch.int64)
    if cols:
        assert 0 <= int(cols_t.min()) and int(cols_t.max()) < vocab_size, "token id outside the vocabulary"
    return torch.tensor(rows, dtype=torch.int64), cols_t


def _column(values: list[float], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True).unsqueeze(1)
