"""The three choice methods on hand-computed numbers."""

from __future__ import annotations

import pytest

from plait.lang.choices import greedy_token_selection, token_length_normalized, unconditional_likelihood_normalized


def lps(*values):
    return [[v, i, None] for i, v in enumerate(values)]


def test_token_length_normalized_argmax_first_on_ties():
    d = token_length_normalized(choices=["a", "b", "c"], normalized_prompt_logprobs=[-1.0, -0.5, -0.5],
                                input_token_logprobs=[lps(-1.0), lps(-0.5), lps(-0.5)],
                                output_token_logprobs=[[], [], []])
    assert d.decision == "b"
    assert d.meta_info["normalized_prompt_logprobs"] == [-1.0, -0.5, -0.5]
    assert not token_length_normalized.requires_unconditional_logprobs


def test_greedy_token_selection_walks_columns():
    # Column 0: A and B tie at -1 (C is out); column 1: B (-1) beats A (-3).
    inputs = [lps(-1.0, -3.0), lps(-1.0, -1.0, -4.0), lps(-2.0)]
    d = greedy_token_selection(choices=["A", "B", "C"], normalized_prompt_logprobs=[-2.0, -2.0, -2.0],
                               input_token_logprobs=inputs, output_token_logprobs=[[], [], []])
    assert d.decision == "B"
    # Shorter choices are padded with their own mean.
    assert d.meta_info["greedy_logprob_matrix"] == [[-1.0, -3.0, -2.0], [-1.0, -1.0, -4.0], [-2.0, -2.0, -2.0]]
    first = greedy_token_selection(choices=["A", "B", "C"], normalized_prompt_logprobs=[0, 0, 0],
                                   input_token_logprobs=[lps(-1.0), lps(-0.5, -9.0), lps(-0.7)],
                                   output_token_logprobs=[[], [], []])
    assert first.decision == "B"  # decided by the first token alone


def test_unconditional_likelihood_normalized():
    cond = [lps(-1.0, -2.0), lps(-3.0), lps(-2.0, -2.0)]
    uncond = [lps(None, -1.0), lps(None), lps(None, -3.0)]
    d = unconditional_likelihood_normalized(choices=["A", "B", "C"], normalized_prompt_logprobs=[-1.5, -3.0, -2.0],
                                            input_token_logprobs=cond, output_token_logprobs=[[], [], []],
                                            unconditional_token_logprobs=uncond)
    # A: mean(-1-0, -2+1) = -1; B: -3; C: mean(-2-0, -2+3) = -0.5.
    assert d.meta_info["normalized_unconditional_prompt_logprobs"] == [-1.0, -3.0, -0.5]
    assert d.decision == "C"
    # token_length_normalized would have picked A: the correction changes the answer.
    assert token_length_normalized(choices=["A", "B", "C"], normalized_prompt_logprobs=[-1.5, -3.0, -2.0],
                                   input_token_logprobs=cond, output_token_logprobs=[[], [], []]).decision == "A"
    assert unconditional_likelihood_normalized.requires_unconditional_logprobs
    with pytest.raises(ValueError):
        unconditional_likelihood_normalized(choices=["A"], normalized_prompt_logprobs=[0],
                                            input_token_logprobs=[lps(1)], output_token_logprobs=[[]])
    with pytest.raises(ValueError):
        unconditional_likelihood_normalized(choices=["A"], normalized_prompt_logprobs=[0],
                                            input_token_logprobs=[lps(1, 2)], output_token_logprobs=[[]],
                                            unconditional_token_logprobs=[lps(None)])
