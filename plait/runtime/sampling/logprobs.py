"""Log-probabilities of tokens under the model's raw distribution (log_softmax of the logits).

Everything is computed in float32 as `logit - logsumexp(logits)`, one formula for every function
here, so the same token gets bit-identical values from `token_logprobs`, `top_logprobs` and
`ids_logprobs` (the greedy token's logprob *is* the top-1 value), and no `[n, vocab]`
log-softmax copy is materialised.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class TopLogprobs(NamedTuple):
    values: torch.Tensor  # [n, k] float32, sorted descending
    ids: torch.Tensor  # [n, k] int64


class ChunkedLogprobs(NamedTuple):
    token_logprobs: torch.Tensor  # [n] float32
    top: TopLogprobs | None  # [n, top_k] when top_k > 0
    ids_logprobs: torch.Tensor | None  # [n, len(ids)] when ids were asked for


def logsumexp32(logits: torch.Tensor) -> torch.Tensor:
    """[n, vocab] -> [n, 1] float32 log normaliser."""
    return torch.logsumexp(logits.float(), dim=-1, keepdim=True)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """logits [n, vocab], token_ids [n] -> [n] float32 logprob of each row's token."""
    assert logits.dim() == 2 and token_ids.shape == (logits.shape[0],)
    x = logits.float()
    picked = x.gather(1, token_ids.to(x.device, torch.int64).unsqueeze(1))  # [n, 1]
    return (picked - logsumexp32(x)).squeeze(1)


def top_logprobs(logits: torch.Tensor, k: int) -> TopLogprobs:
    """The k most likely tokens of each row: values [n, k] (desc) and ids [n, k]; k is capped at vocab."""
    assert logits.dim() == 2 and k >= 0
    x = logits.float()
    k = min(k, x.shape[1])
    values, ids = x.topk(k, dim=-1, largest=True, sorted=True)  # [n, k]
    return TopLogprobs(values - logsumexp32(x), ids)


def ids_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """logits [n, vocab] -> [n, len(ids)] float32 logprobs of the same token ids in every row."""
    assert logits.dim() == 2
    x = logits.float()
    assert all(0 <= i < x.shape[1] for i in ids), "id outside the vocabulary"
    index = torch.tensor(ids, dtype=torch.int64).to(x.device, non_blocking=True)  # no wait for queued work
    return x.index_select(1, index) - logsumexp32(x)


def compute_logprobs_chunked(
    rows: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    to_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    top_k: int = 0,
    ids: list[int] | None = None,
    chunk_size: int = 1024,
) -> ChunkedLogprobs:
    """Logprobs for many positions (prompt logprobs) without holding `[n, vocab]` float32 at once.

    `rows` is either the logits ([n, vocab], `to_logits` None) or hidden states ([n, hidden])
    that `to_logits` (the LM head) turns into logits chunk by chunk, which is where the memory
    goes for long prompts. `token_ids[i]` is the token whose logprob is wanted at row i (for a
    prompt: the *next* prompt token). Results are identical to the unchunked functions.
    """
    assert rows.dim() == 2 and token_ids.shape == (rows.shape[0],) and chunk_size >= 1
    token_parts: list[torch.Tensor] = []
    top_values: list[torch.Tensor] = []
    top_ids: list[torch.Tensor] = []
    ids_parts: list[torch.Tensor] = []
    for start in range(0, rows.shape[0], chunk_size):
        chunk = rows[start : start + chunk_size]
        logits = to_logits(chunk) if to_logits is not None else chunk  # [c, vocab]
        token_parts.append(token_logprobs(logits, token_ids[start : start + chunk_size]))
        if top_k > 0:
            top = top_logprobs(logits, top_k)
            top_values.append(top.values)
            top_ids.append(top.ids)
        if ids:
            ids_parts.append(ids_logprobs(logits, ids))
    n = rows.shape[0]
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=rows.device)
        top = TopLogprobs(empty.view(0, 0), empty.view(0, 0).long()) if top_k > 0 else None
        return ChunkedLogprobs(empty, top, empty.view(0, len(ids)) if ids else None)
    return ChunkedLogprobs(
        token_logprobs=torch.cat(token_parts),
        top=TopLogprobs(torch.cat(top_values), torch.cat(top_ids)) if top_k > 0 else None,
        ids_logprobs=torch.cat(ids_parts) if ids else None,
    )
