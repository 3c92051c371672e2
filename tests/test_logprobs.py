"""Logprob helpers against torch.log_softmax, and against each other."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.sampling.logprobs import (
    compute_logprobs_chunked,
    ids_logprobs,
    token_logprobs,
    top_logprobs,
)


@pytest.fixture
def logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 1000, generator=gen) * 8  # peaked rows: a naive exp() would lose mass


def test_token_logprobs_match_log_softmax(logits):
    ids = torch.tensor([0, 5, 999, 17, 3, 500])
    expected = torch.log_softmax(logits.double(), -1).gather(1, ids.unsqueeze(1)).squeeze(1)
    out = token_logprobs(logits, ids)
    assert out.dtype == torch.float32 and out.shape == (6,)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_exp_sums_to_one(logits):
    vocab = logits.shape[1]
    full = top_logprobs(logits, vocab).values
    torch.testing.assert_close(full.double().exp().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)
    every = ids_logprobs(logits, list(range(vocab)))
    torch.testing.assert_close(every.double().exp().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)


def test_greedy_token_logprob_is_top1(logits):
    top = top_logprobs(logits, 1)
    assert torch.equal(top.ids[:, 0], logits.argmax(-1))
    assert torch.equal(token_logprobs(logits, logits.argmax(-1)), top.values[:, 0])


def test_top_logprobs_sorted_and_consistent(logits):
    top = top_logprobs(logits, 20)
    assert top.values.shape == top.ids.shape == (6, 20)
    assert (top.values[:, :-1] >= top.values[:, 1:]).all()
    for j in range(20):
        assert torch.equal(token_logprobs(logits, top.ids[:, j]), top.values[:, j])
    assert top_logprobs(logits, 5000).values.shape == (6, 1000)  # k capped at the vocabulary
    assert top_logprobs(logits, 0).values.shape == (6, 0)


def test_ids_logprobs_agree_with_token_logprobs(logits):
    ids = [7, 0, 999, 7]
    out = ids_logprobs(logits, ids)
    assert out.shape == (6, 4)
    for j, t in enumerate(ids):
        assert torch.equal(out[:, j], token_logprobs(logits, torch.full((6,), t)))
    assert ids_logprobs(logits, []).shape == (6, 0)


def test_low_precision_input_is_computed_in_float32(logits):
    half = logits.to(torch.bfloat16)
    ids = half.argmax(-1)
    out = token_logprobs(half, ids)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(half.float(), -1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked_on_logits(chunk_size):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 300, generator=gen) * 4
    targets = torch.randint(0, 300, (50,), generator=gen)
    out = compute_logprobs_chunked(logits, targets, top_k=5, ids=[1, 2, 299], chunk_size=chunk_size)
    assert torch.equal(out.token_logprobs, token_logprobs(logits, targets))
    assert torch.equal(out.top.values, top_logprobs(logits, 5).values)
    assert torch.equal(out.top.ids, top_logprobs(logits, 5).ids)
    assert torch.equal(out.ids_logprobs, ids_logprobs(logits, [1, 2, 299]))


def test_chunked_through_lm_head_bounds_rows_per_call():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 16, generator=gen)
    weight = torch.randn(200, 16, generator=gen)
    targets = torch.randint(0, 200, (37,), generator=gen)
    calls: list[int] = []

    def lm_head(h: torch.Tensor) -> torch.Tensor:
        calls.append(h.shape[0])
        return h @ weight.T

    out = compute_logprobs_chunked(hidden, targets, to_logits=lm_head, chunk_size=10)
    assert calls == [10, 10, 10, 7]
    assert out.top is None and out.ids_logprobs is None
    torch.testing.assert_close(out.token_logprobs, token_logprobs(hidden @ weight.T, targets), atol=1e-5, rtol=0)


def test_chunked_empty():
    out = compute_logprobs_chunked(torch.empty(0, 10), torch.empty(0, dtype=torch.int64), top_k=2, ids=[1])
    assert out.token_logprobs.shape == (0,) and out.ids_logprobs.shape == (0, 1)
