"""Shared pieces of the constrained-decoding tests: every grammar backend on the default tokenizer
(a session fixture), and helpers that feed a grammar text or walk it at random through its mask."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from plait.runtime.constrained.base import GRAMMAR_BACKENDS, GrammarKey, backend_class
from plait.runtime.constrained.manager import bitmask_width, unpack_bitmask

BACKENDS = sorted(GRAMMAR_BACKENDS)
EXTRA_VOCAB = 64  # model vocab beyond the tokenizer's (a padded lm_head): those ids must never be allowed
PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# An EBNF grammar of integer arithmetic: the examples feed it expressions, the property tests walk it.
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""

_backends: dict[str, object] = {}


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request, default_tokenizer):
    name = request.param
    if name not in _backends:
        _backends[name] = backend_class(name)(default_tokenizer, len(default_tokenizer.hf) + EXTRA_VOCAB)
    return _backends[name]


@pytest.fixture(scope="module")
def hf(default_tokenizer):
    return default_tokenizer.hf


def encode(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def decode(hf, ids: list[int]) -> str:
    return hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def accepts(backend, key: GrammarKey, text: str) -> bool:
    """The grammar takes the text's tokens and then ends (accepts a stop token)."""
    matcher = backend.new_matcher(backend.compile(key))
    ok = all(matcher.accept_token(t) for t in encode(backend.hf, text))
    return ok and matcher.accept_token(backend.stop_token_ids[0]) and matcher.is_terminated()


def allowed_ids(backend, matcher) -> list[int]:
    bitmask = torch.zeros(1, bitmask_width(backend.vocab_size), dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    return np.flatnonzero(unpack_bitmask(bitmask, backend.vocab_size)[0].numpy()).tolist()


_CLOSERS = frozenset('"}])')
_closer_masks: dict[int, np.ndarray] = {}


def closer_mask(backend) -> np.ndarray:
    """bool [vocab]: tokens spelled only with `"}])` (they end strings, objects, arrays, groups)."""
    if backend.vocab_size not in _closer_masks:
        pieces = backend.hf.convert_ids_to_tokens(list(range(len(backend.hf))))
        mask = np.zeros(backend.vocab_size, dtype=bool)
        mask[: len(pieces)] = [bool(p) and set(p) <= _CLOSERS for p in pieces]
        _closer_masks[backend.vocab_size] = mask
    return _closer_masks[backend.vocab_size]


def random_walk(backend, key: GrammarKey, seed: int, *, soft_cap: int = 48, max_steps: int = 400) -> str:
    """Sample uniformly among allowed tokens until the grammar accepts a stop token; the text.

    After `soft_cap` tokens, stop tokens and then tokens spelled only with `"}])` go first when the
    mask has any, so grammars with unbounded parts (free strings, open objects) still end; every path
    is still one the mask allowed, which is all the tests rely on."""
    rng = random.Random(seed)
    hf = backend.hf
    matcher = backend.new_matcher(backend.compile(key))
    stop_mask = np.zeros(backend.vocab_size, dtype=bool)
    stop_mask[backend.stop_token_ids] = True
    bitmask = torch.zeros(1, bitmask_width(backend.vocab_size), dtype=torch.int32)
    ids: list[int] = []
    for step in range(max_steps):
        matcher.fill_bitmask(bitmask, 0)
        allowed = unpack_bitmask(bitmask, backend.vocab_size)[0].numpy()  # [vocab] bool
        assert allowed.any(), f"the grammar allows nothing after {decode(hf, ids)!r}"
        assert not allowed[len(hf) :].any(), "an id past the tokenizer's vocabulary was allowed"
        if step >= soft_cap:
            for preferred in (stop_mask, closer_mask(backend)):
                if (allowed & preferred).any():
                    allowed = allowed & preferred
                    break
        candidates = np.flatnonzero(allowed)
        token = int(candidates[rng.randrange(len(candidates))])
        assert matcher.accept_token(token), "a token from the mask was refused"
        if matcher.is_terminated():
            assert token in backend.stop_token_ids
            return decode(hf, ids)
        ids.append(token)
    raise AssertionError(f"no stop after {max_steps} tokens: {decode(hf, ids)!r}")
