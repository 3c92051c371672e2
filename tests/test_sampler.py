"""Batched sampler: each parameter checked against its definition, per row, in mixed batches.

Statistical tests draw thousands of samples as thousands of identical rows of one batch (a fixed
global seed makes them deterministic) and compare the counts with the distribution the
parameters define, by chi-square; tokens the parameters exclude must have exactly zero count.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from plait.runtime.sampling.penalties import PenaltyState, apply_penalties
from plait.runtime.sampling.sampler import (
    Sampler,
    SamplingBatchInfo,
    filter_probs,
    process_logits,
    row_seed,
)
from plait.sampling_params import SamplingParams

# A small vocabulary with a known distribution, probabilities away from every cut-off below.
PROBS = torch.tensor([0.32, 0.22, 0.16, 0.11, 0.08, 0.06, 0.03, 0.02])
LOGITS = PROBS.log() + 1.7  # the shift checks nothing assumes normalised logits
VOCAB = PROBS.shape[0]
NUM_DRAWS = 20000


def sp(**kw) -> SamplingParams:
    params = SamplingParams(**kw)
    params.normalize()
    params.verify()
    return params


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)
DEVICES = ["cpu", CUDA]


def build(params, *, vocab=VOCAB, output_ids=None, prompt_ids=None, device="cpu", **kw) -> SamplingBatchInfo:
    bs = len(params)
    return SamplingBatchInfo.build(
        params,
        vocab_size=vocab,
        device=device,
        output_ids=output_ids if output_ids is not None else [[] for _ in range(bs)],
        prompt_ids=prompt_ids if prompt_ids is not None else [[] for _ in range(bs)],
        **kw,
    )


def draw(params: SamplingParams, logits: torch.Tensor = LOGITS, n: int = NUM_DRAWS) -> torch.Tensor:
    """Token counts [vocab] of n draws, as n rows of one batch."""
    info = build([params] * n, vocab=logits.shape[0])
    out = Sampler()(logits.expand(n, -1), info)
    return torch.bincount(out.next_token_ids, minlength=logits.shape[0])


def assert_matches(counts: torch.Tensor, expected: torch.Tensor) -> None:
    """Zero counts where expected is 0; chi-square agreement on the support."""
    expected = expected.double() / expected.double().sum()
    support = expected > 0
    assert counts[~support].sum().item() == 0, f"sampled excluded tokens: {counts.tolist()}"
    f_exp = (expected[support] * counts.sum()).numpy()
    f_obs = counts[support].double().numpy()
    if support.sum() > 1:
        pvalue = chisquare(f_obs, f_exp).pvalue
        assert pvalue > 1e-3, f"counts {counts.tolist()} vs expected {f_exp.tolist()} (p={pvalue:.2e})"


def reference_filter(probs: list[float], *, top_k: int, top_p: float, min_p: float) -> list[float]:
    """The definitions in plain Python: top-k, then top-p on the renormalised rest, then min-p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order[:top_k] if top_k > 0 else order)
    total = sum(probs[i] for i in keep)
    if top_p < 1:
        mass, kept = 0.0, set()
        for i in order:
            if i in keep and mass < top_p:
                kept.add(i)
                mass += probs[i] / total
        keep = kept
    top = max(probs)
    keep = {i for i in keep if probs[i] >= min_p * top}
    return [probs[i] if i in keep else 0.0 for i in range(len(probs))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ----- greedy ---------------------------------------------------------------------------------


def test_greedy_rows_are_argmax_in_mixed_batch():
    logits = torch.randn(6, 50)
    params = [sp(temperature=0), sp(temperature=1.5), sp(top_k=1), sp(temperature=1.5, top_p=0.9),
              sp(temperature=0, top_p=0.5, min_p=0.3), sp(temperature=2.0)]
    info = build(params, vocab=50)
    assert not info.is_all_greedy and info.greedy_rows.tolist() == [True, False, True, False, True, False]
    sampler = Sampler()
    seen_sampled = [set() for _ in range(6)]
    for _ in range(30):
        ids = sampler(logits, info).next_token_ids
        for row in (0, 2, 4):
            assert ids[row].item() == logits[row].argmax().item()
        for row in (1, 3, 5):
            seen_sampled[row].add(ids[row].item())
    assert all(len(seen_sampled[row]) > 1 for row in (1, 3, 5))


def test_all_greedy_batch():
    logits = torch.randn(4, 30)
    info = build([sp(temperature=0)] * 4, vocab=30)
    assert info.is_all_greedy
    assert torch.equal(Sampler()(logits, info).next_token_ids, logits.argmax(-1))


def test_cheap_state_when_nothing_is_used():
    info = build([sp(), sp(temperature=0.5)])
    assert info.penalties is None and info.logit_bias is None and info.min_tokens_mask is None
    assert not (info.need_top_k or info.need_top_p or info.need_min_p)


# ----- statistics: temperature, top-k, top-p, min-p -------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax_of_scaled_logits(temperature):
    counts = draw(sp(temperature=temperature))
    assert_matches(counts, torch.softmax(LOGITS / temperature, -1))


def test_temperature_changes_the_spread():
    top_share = {t: draw(sp(temperature=t))[0].item() / NUM_DRAWS for t in (0.3, 1.0, 3.0)}
    for t, share in top_share.items():
        assert abs(share - torch.softmax(LOGITS / t, -1)[0].item()) < 0.02
    assert top_share[0.3] > top_share[1.0] + 0.2 > top_share[3.0] + 0.2


def test_top_k():
    counts = draw(sp(top_k=3))
    expected = PROBS.clone()
    expected[3:] = 0
    assert_matches(counts, expected)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.3, 1), (0.5, 2), (0.6, 3), (0.7, 3), (0.75, 4), (0.93, 6), (0.96, 7), (1.0, 8)],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    # cumulative: 0.32 0.54 0.70 0.81 0.89 0.95 0.98 1.00
    counts = draw(sp(top_p=top_p))
    expected = PROBS.clone()
    expected[kept:] = 0
    assert_matches(counts, expected)


@pytest.mark.parametrize(("min_p", "kept"), [(0.2, 5), (0.3, 4), (0.5, 3), (0.9, 1)])
def test_min_p_drops_tokens_below_fraction_of_max(min_p, kept):
    # thresholds 0.064, 0.096, 0.16, 0.288 against probs 0.32 0.22 0.16 0.11 0.08 0.06 ...
    counts = draw(sp(min_p=min_p))
    expected = PROBS.clone()
    expected[kept:] = 0
    assert_matches(counts, expected)


def test_filter_probs_matches_reference_on_random_rows():
    gen = torch.Generator().manual_seed(7)
    vocab = 12
    params, rows = [], []
    for _ in range(200):
        top_k = int(torch.randint(-1, vocab + 3, (), generator=gen))  # -1/0: off; > vocab: off; 1 is greedy
        top_p = float(torch.rand((), generator=gen)) * 0.99 + 0.01 if torch.rand((), generator=gen) < 0.7 else 1.0
        min_p = float(torch.rand((), generator=gen)) * 0.5 if torch.rand((), generator=gen) < 0.5 else 0.0
        params.append(sp(top_k=2 if top_k == 1 else top_k, top_p=top_p, min_p=min_p))
        rows.append(torch.softmax(torch.randn(vocab, generator=gen) * 2, -1))
    probs = torch.stack(rows)  # [200, vocab]
    out = filter_probs(probs, build(params, vocab=vocab))
    for i, p in enumerate(params):
        ref = reference_filter(probs[i].tolist(), top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
        kept_ref = [x > 0 for x in ref]
        kept_out = (out[i] > 0).tolist()
        assert kept_out == kept_ref, (p, probs[i].tolist())
        assert torch.equal(out[i][out[i] > 0], probs[i][out[i] > 0])


@pytest.mark.parametrize("device", DEVICES)
def test_combined_params_exact_per_row_in_one_batch(device):
    configs = [
        sp(temperature=0.8, top_k=6, top_p=0.8, min_p=0.15),
        sp(temperature=1.3, top_k=4, top_p=0.9),
        sp(temperature=1.0, top_p=0.6, min_p=0.6),
        sp(temperature=0),
    ]
    per = 6000
    params = [configs[i % len(configs)] for i in range(per * len(configs))]  # interleaved rows
    out = Sampler()(LOGITS.to(device).expand(len(params), -1), build(params, device=device))
    ids = out.next_token_ids.cpu().view(per, len(configs))
    for c, p in enumerate(configs):
        counts = torch.bincount(ids[:, c], minlength=VOCAB)
        if p.is_greedy:
            assert counts[0].item() == per
            continue
        scaled = torch.softmax(LOGITS / p.temperature, -1).tolist()
        assert_matches(counts, torch.tensor(reference_filter(scaled, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)))


# ----- penalties, bias, min_new_tokens, vocab mask ----------------------------------------------


def test_frequency_and_presence_shift_seen_output_tokens_exactly():
    vocab = 10
    logits = torch.randn(2, vocab)
    params = [sp(frequency_penalty=0.5, presence_penalty=0.25), sp()]
    info = build(params, vocab=vocab, output_ids=[[3, 3, 5, 3], [3, 5]], prompt_ids=[[7, 7], [1]])
    delta = process_logits(logits, info) - logits
    expected = torch.zeros(vocab)
    expected[3] = -(3 * 0.5 + 0.25)
    expected[5] = -(1 * 0.5 + 0.25)  # prompt token 7 does not count
    torch.testing.assert_close(delta[0], expected, atol=1e-6, rtol=0)
    assert torch.equal(delta[1], torch.zeros(vocab))


def test_negative_presence_penalty_encourages():
    info = build([sp(presence_penalty=-1.5)], vocab=4, output_ids=[[2]])
    logits = torch.zeros(1, 4)
    assert process_logits(logits, info)[0].tolist() == [0.0, 0.0, 1.5, 0.0]


def test_repetition_penalty_divides_positive_multiplies_negative_on_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 4.0, 0.5], [2.0, -2.0, 3.0, -1.0, 4.0, 0.5]])
    params = [sp(repetition_penalty=2.0), sp()]
    info = build(params, vocab=6, output_ids=[[0, 1], [0, 1]], prompt_ids=[[3, 4, 4], [3]])
    out = process_logits(logits, info)
    assert out[0].tolist() == [1.0, -4.0, 3.0, -2.0, 2.0, 0.5]
    assert torch.equal(out[1], logits[1])


def test_penalty_state_is_built_only_for_used_penalties():
    state = PenaltyState.build([sp(repetition_penalty=1.2), sp()], output_ids=[[1], [2]], prompt_ids=[[0], [0]],
                               vocab_size=4, device="cpu")
    assert state.output_counts is None and state.seen is not None
    assert state.seen.tolist() == [[True, True, False, False], [False, False, False, False]]
    assert apply_penalties(torch.ones(2, 4), None).tolist() == torch.ones(2, 4).tolist()


def test_presence_penalty_changes_greedy_choice():
    logits = torch.tensor([[5.0, 4.5, 0.0]])
    info = build([sp(temperature=0, presence_penalty=1.0)], vocab=3, output_ids=[[0]])
    assert Sampler()(logits, info).next_token_ids.item() == 1


def test_logit_bias_is_added_to_its_row_only():
    logits = torch.randn(2, 8)
    info = build([sp(logit_bias={2: 5.0, 6: -100.0}), sp()])
    delta = process_logits(logits, info) - logits
    expected = torch.zeros(8)
    expected[2], expected[6] = 5.0, -100.0
    torch.testing.assert_close(delta[0], expected, atol=1e-5, rtol=0)
    assert torch.equal(delta[1], torch.zeros(8))
    counts = draw(sp(logit_bias={7: math.log(8.0)}))  # token 7: 0.02 -> 0.16 before renormalising
    expected = PROBS.clone()
    expected[7] *= 8
    assert_matches(counts, expected)


def test_min_new_tokens_masks_stop_ids_until_reached():
    eos, stop = 9, 4
    logits = torch.zeros(3, 10)
    logits[:, eos] = 10.0
    logits[:, stop] = 9.0
    params = [sp(temperature=0, min_new_tokens=3)] * 3
    output_ids = [[1, 2], [1, 2, 3], []]
    info = build(params, vocab=10, output_ids=output_ids, stop_token_ids_for_min=[[eos, stop]] * 3)
    processed = process_logits(logits, info)
    assert processed[0, eos] == -math.inf and processed[0, stop] == -math.inf
    assert processed[1, eos] == 10.0  # minimum reached
    ids = Sampler()(logits, info).next_token_ids.tolist()
    assert ids[0] not in (eos, stop) and ids[1] == eos and ids[2] not in (eos, stop)
    # Without the explicit list, the request's own stop_token_ids are masked (not eos).
    info = build([sp(temperature=0, min_new_tokens=1, stop_token_ids=[stop])], vocab=10)
    processed = process_logits(logits[:1], info)
    assert processed[0, stop] == -math.inf and processed[0, eos] == 10.0


def test_vocab_mask_restricts_greedy_and_sampled_rows():
    logits = torch.randn(200, 16)
    allowed = torch.zeros(200, 16, dtype=torch.bool)
    allowed[:, [3, 5, 11]] = True
    allowed[0] = False
    allowed[0, 7] = True
    params = [sp(temperature=0)] * 100 + [sp(temperature=2.0)] * 100
    ids = Sampler()(logits, build(params, vocab=16), vocab_mask=allowed).next_token_ids
    assert ids[0].item() == 7
    assert set(ids[1:].tolist()) <= {3, 5, 11} and len(set(ids[100:].tolist())) == 3
    masked = logits.masked_fill(~allowed, -math.inf)
    assert torch.equal(ids[:100], masked[:100].argmax(-1))


def test_input_logits_are_not_modified():
    logits = torch.randn(2, 8)
    before = logits.clone()
    info = build([sp(logit_bias={1: 3.0}, repetition_penalty=1.5, min_new_tokens=2, stop_token_ids=[0]),
                  sp(frequency_penalty=1.0)], output_ids=[[2], [3]])
    Sampler()(logits, info, vocab_mask=torch.ones(2, 8, dtype=torch.bool))
    assert torch.equal(logits, before)


# ----- seeds --------------------------------------------------------------------------------------


def _seeded_run(
    seed: int, position: int, companions: list[SamplingParams], steps: int = 25, device: str = "cpu"
) -> list[int]:
    """Sample `steps` tokens for a seeded request sitting at `position` among `companions`."""
    vocab = 64
    target = torch.linspace(0, 1, vocab)  # nearly flat: every draw matters
    params = list(companions)
    params.insert(position, sp(seed=seed, temperature=1.0, top_p=0.95))
    sampler = Sampler()
    tokens: list[int] = []
    for step in range(steps):
        logits = torch.randn(len(params), vocab) * 3
        logits[position] = target
        output_ids = [[] for _ in params]
        output_ids[position] = list(tokens)
        info = build(params, vocab=vocab, output_ids=output_ids, device=device)
        logits = logits.to(device)
        assert info.step_offsets[position] == step
        tokens.append(sampler(logits, info).next_token_ids[position].item())
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproduces_across_batch_compositions(device):
    torch.manual_seed(1)
    alone = _seeded_run(42, 0, [], device=device)
    torch.manual_seed(2)
    crowded = _seeded_run(
        42, 3, [sp(), sp(temperature=0), sp(seed=7), sp(top_k=5), sp(temperature=0.3)], device=device
    )
    torch.manual_seed(3)
    second = _seeded_run(42, 1, [sp(seed=42, temperature=2.0), sp()], device=device)
    assert alone == crowded == second
    assert len(set(alone)) > 5  # the stream moves with the step


def test_different_seeds_differ():
    assert _seeded_run(42, 0, []) != _seeded_run(43, 0, [])
    assert row_seed(42, 0) != row_seed(42, 1) != row_seed(43, 0)


def test_unseeded_rows_differ_across_calls():
    logits = torch.zeros(1, 64)
    info = build([sp()], vocab=64)
    sampler = Sampler()
    first = [sampler(logits, info).next_token_ids.item() for _ in range(20)]
    second = [sampler(logits, info).next_token_ids.item() for _ in range(20)]
    assert first != second and len(set(first)) > 5


def test_seeded_draws_follow_the_distribution():
    # Many seeded requests (different seeds) at one step: the per-row streams are still Exp(1).
    n = 4000
    params = [sp(seed=s) for s in range(n)]
    ids = Sampler()(LOGITS.expand(n, -1), build(params)).next_token_ids
    assert_matches(torch.bincount(ids, minlength=VOCAB), PROBS)


# ----- robustness, logprobs, dtypes, devices ----------------------------------------------------


def test_broken_rows_fall_back_to_argmax_without_touching_others():
    logits = torch.randn(4, 10)
    logits[1, 4] = float("nan")  # softmax of the row is all NaN
    logits[2, 6] = float("inf")  # inf - inf: all NaN too
    info = build([sp(seed=1), sp(temperature=0.7), sp(top_p=0.5), sp(seed=2)], vocab=10)
    ids = Sampler()(logits, info).next_token_ids
    assert ids[1].item() == 4 and ids[2].item() == 6
    clean = logits.clone()
    clean[1:3] = 0
    ids_clean = Sampler()(clean, info).next_token_ids
    assert ids_clean[0] == ids[0] and ids_clean[3] == ids[3]


def test_output_logprobs_are_raw_model_logprobs():
    logits = torch.randn(4, 20)
    params = [sp(temperature=0), sp(temperature=0.3, top_k=3), sp(temperature=0, presence_penalty=2.0),
              sp(temperature=1.7, logit_bias={5: 3.0})]
    out = Sampler()(logits, build(params, vocab=20, output_ids=[[1], [2], [logits[2].argmax().item()], [3]]))
    raw = torch.log_softmax(logits, -1)
    expected = raw.gather(1, out.next_token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected, atol=1e-6, rtol=0)
    assert out.logprobs[0].item() == pytest.approx(raw[0].max().item(), abs=1e-6)
    assert out.next_token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    logits = torch.randn(4, 40).to(dtype)
    params = [sp(temperature=0), sp(top_p=0.8), sp(top_k=3, seed=3), sp(min_p=0.1)]
    out = Sampler()(logits, build(params, vocab=40))
    assert out.next_token_ids[0].item() == logits[0].float().argmax().item()
    assert out.logprobs.dtype == torch.float32 and torch.isfinite(out.logprobs).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_batch():
    logits = torch.randn(4, 100, device="cuda")
    params = [sp(temperature=0), sp(top_p=0.9, top_k=20, min_p=0.05), sp(seed=5, presence_penalty=1.0), sp()]
    info = SamplingBatchInfo.build(params, vocab_size=100, device="cuda", output_ids=[[1], [2], [3], []],
                                   prompt_ids=[[0]] * 4)
    out = Sampler()(logits, info)
    assert out.next_token_ids.device.type == "cuda"
    assert out.next_token_ids[0].item() == logits[0].argmax().item()
    again = Sampler()(logits, info)
    assert out.next_token_ids[2].item() == again.next_token_ids[2].item()


def test_cpu_argmax_matches_torch_on_ties_nans_and_masked_rows():
    from plait.runtime.sampling.sampler import _argmax_rows

    x = torch.randn(6, 49152)
    x[1, 7] = x[1, 9] = x[1].max() + 1  # a tie: the first wins
    x[2, 3] = x[2, 10] = float("nan")  # NaN is the maximum
    x[3] = float("-inf")  # everything masked
    x[4, 5] = float("inf")
    got = _argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
    assert got[:3].tolist()[1:] == [7, 3]
    t = x.t().contiguous().t()  # not contiguous: torch's own path
    assert torch.equal(_argmax_rows(t), x.argmax(dim=-1))
