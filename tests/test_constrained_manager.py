"""The grammar manager (compiles off the scheduler's thread, caches, fills batch masks) and
jump-forward (forced text found from the grammar, checked against the tokenizer's own encoding)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.runtime.constrained.base import GrammarError, GrammarKey
from plait.runtime.constrained.jump_forward import (
    JumpForward,
    apply_jump,
    jump_forward_tokens,
    retokenize_jump,
)
from plait.runtime.constrained.manager import (
    GrammarManager,
    _unpack_numpy,
    _unpack_torch,
)
from plait.sampling_params import SamplingParams
from tests.constrained_support import EXTRA_VOCAB, backend, hf, encode, decode, allowed_ids  # noqa: F401 (fixtures)


# ---- the manager: async compile, cache, batch masks ---------------------------------------------------
@pytest.fixture(scope="module")
def manager(default_tokenizer):
    # xgrammar: the quicker backend to set up (the manager builds its own); the manager is backend-agnostic.
    mgr = GrammarManager("xgrammar", default_tokenizer, len(default_tokenizer.hf) + EXTRA_VOCAB)
    yield mgr
    mgr.shutdown()


def test_compile_runs_off_thread_and_is_cached(manager):
    backend = manager.backend
    gate, threads = threading.Event(), []
    real_compile = type(backend).compile

    def slow_compile(key):
        threads.append(threading.current_thread())
        assert gate.wait(10)
        return real_compile(backend, key)

    backend.compile = slow_compile  # an instance attribute shadows the method
    try:
        key = GrammarKey("regex", r"cached-\d+")
        first = manager.request(key)
        assert not first.done(), "request() must not wait for the compile"
        assert manager.request(key) is first, "a request during the compile shares it"
        gate.set()
        compiled = first.result(timeout=10)
        assert threads and all(t is not threading.current_thread() for t in threads)
        assert len(threads) == 1, "compiled once"
        again = manager.request(key)
        assert again.done() and again.result() is compiled
        assert manager.request(SamplingParams(regex=r"cached-\d+")).result() is compiled
    finally:
        del backend.compile
    assert manager.request(SamplingParams()) is None


def test_bad_spec_fails_the_future(manager):
    future = manager.request(GrammarKey("regex", "(unclosed"))
    assert isinstance(future.exception(timeout=10), GrammarError)
    assert manager.request(GrammarKey("regex", "(unclosed")) is future, "failures are cached too"


def test_cache_is_bounded_lru(manager):
    manager.clear_cache()
    manager.cache_size = 2
    try:
        a, b, c = (GrammarKey("regex", s) for s in ("lru-a", "lru-b", "lru-c"))
        fa = manager.request(a)
        manager.request(b)
        assert manager.request(a) is fa  # a is now the most recent
        manager.request(c)  # evicts b
        assert manager.request(a) is fa
        assert list(manager._cache) == [c, a]
    finally:
        manager.cache_size = 256


def test_batch_mask_mixed_rows(manager, hf):
    assert manager.batch_mask([None, None], device="cpu") is None, "unconstrained batches pay nothing"
    compiled = manager.request(GrammarKey("regex", "[0-9]{2}x")).result(timeout=10)
    fresh = manager.new_matcher(compiled)
    advanced = manager.new_matcher(compiled)
    assert all(advanced.accept_token(t) for t in encode(hf, "12"))
    mask = manager.batch_mask([None, fresh, None, advanced], device="cpu")  # [4, vocab]
    assert mask.shape == (4, manager.vocab_size) and mask.dtype == torch.bool
    assert mask[0].all() and mask[2].all(), "unconstrained rows allow everything, padded ids included"
    rows = mask.numpy()
    for row, matcher in ((1, fresh), (3, advanced)):
        assert np.flatnonzero(rows[row]).tolist() == allowed_ids(manager.backend, matcher)
    assert decode(hf, np.flatnonzero(rows[3]).tolist()) == "x"
    assert not rows[1, len(hf) :].any()
    for token in np.flatnonzero(rows[1]).tolist():
        assert decode(hf, [token]).isdigit()


@pytest.mark.parametrize("unpack", [_unpack_numpy, _unpack_torch])  # the CPU path, the device path
def test_unpack_bitmask_reference(unpack):
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    vocab = 4 * 32 - 5
    got = unpack(words, vocab)
    assert got.shape == (3, vocab) and got.dtype == torch.bool
    for row in range(3):
        for token in range(vocab):
            bit = (int(words[row, token // 32]) >> (token % 32)) & 1
            assert bool(got[row, token]) == bool(bit)


# ---- jump-forward -----------------------------------------------------------------------------------
USER_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "role": {"enum": ["admin", "user"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "role", "ok"],
}


def test_find_jump_forward(backend, hf):
    matcher = backend.new_matcher(backend.compile(GrammarKey("json_schema", json.dumps(USER_SCHEMA))))
    assert matcher.find_jump_forward() == '{"name": "'
    for t in encode(hf, '{"name": "Al'):
        matcher.accept_token(t)
    assert matcher.find_jump_forward() == "", "a string can go on or end"
    matcher = backend.new_matcher(backend.compile(GrammarKey("choices", '["yes", "yep"]')))
    assert matcher.find_jump_forward() == "ye"


@pytest.mark.parametrize(
    "value",
    [
        {"name": "Alice", "age": 30, "tags": ["a", "bc d"], "role": "admin", "ok": True},
        {"name": "", "age": -7, "tags": [], "role": "user", "ok": False},
        {"name": "Zoë \"Z\"", "age": 123456, "tags": ["x"], "role": "user", "ok": True},
    ],
)
def test_jump_forward_reproduces_canonical_tokens(backend, hf, value):
    """A greedy model that writes the canonical tokens of `value` ends with exactly those tokens
    when jump-forward fills in the forced parts, in fewer decode steps."""
    canonical = encode(hf, json.dumps(value, ensure_ascii=False))
    matcher = backend.new_matcher(backend.compile(GrammarKey("json_schema", json.dumps(USER_SCHEMA))))
    out: list[int] = []
    decode_steps = jumps = 0
    while len(out) < len(canonical):
        jump = jump_forward_tokens(hf, matcher, out)
        if jump is not None:
            out = out[: len(out) - jump.num_dropped] + jump.new_ids
            assert out == canonical[: len(out)], decode(hf, out)
            jumps += 1
            continue
        token = canonical[len(out)]
        assert matcher.accept_token(token)
        out.append(token)
        decode_steps += 1
    assert out == canonical and decode(hf, out) == json.dumps(value, ensure_ascii=False)
    assert matcher.accept_token(backend.stop_token_ids[0])
    assert jumps >= 4 and decode_steps < len(canonical)


def test_retokenize_merges_the_boundary(hf):
    out = encode(hf, '{"name": "Alice"')
    assert decode(hf, out[-1:]) == '"', "the closing quote is its own token here"
    jump = retokenize_jump(hf, out, ', "age": ')
    assert jump.num_dropped == 1 and decode(hf, jump.new_ids[:1]) == '",', "the tokenizer writes `\",` as one token"
    assert jump.text == ', "age":', "the last token (the space, which merges with a number) is held back"
    assert decode(hf, out[:-1] + jump.new_ids) == '{"name": "Alice", "age":'
    assert jump.gain == len(jump.new_ids) - 1


def test_retokenize_declines(hf):
    assert retokenize_jump(hf, encode(hf, '{"a": 1'), "}") is None, "only the held-back token"
    assert retokenize_jump(hf, encode(hf, "x"), "") is None
    clef = encode(hf, "𝄞")
    assert len(clef) > 1
    assert retokenize_jump(hf, clef[:1], "abc def") is None, "the output ends inside a character"
    assert retokenize_jump(hf, [], '{"name": "').new_ids == encode(hf, '{"name":'), "works on an empty output"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    prefix=st.text(alphabet='ab {}[]":, 0é\n', max_size=12),
    forced=st.text(alphabet='ab {}[]":, 0é\n', min_size=1, max_size=12),
)
def test_retokenize_keeps_the_text(hf, prefix, forced):
    out = encode(hf, prefix)
    jump = retokenize_jump(hf, out, forced, window=2)
    if jump is None:
        return
    assert 0 <= jump.num_dropped <= len(out)
    assert jump.text and forced.startswith(jump.text)
    assert decode(hf, out[: len(out) - jump.num_dropped] + jump.new_ids) == decode(hf, out) + jump.text


def test_jump_forward_advances_the_matcher(backend, hf):
    key = GrammarKey("json_schema", json.dumps(USER_SCHEMA))
    matcher = backend.new_matcher(backend.compile(key))
    out = encode(hf, '{"name": "Bob"')
    assert all(matcher.accept_token(t) for t in out)
    assert jump_forward_tokens(hf, matcher, out, min_gain=100) is None
    jump = jump_forward_tokens(hf, matcher, out)
    assert jump is not None and jump.text.startswith(', "age":')
    new_out = out[: len(out) - jump.num_dropped] + jump.new_ids
    reference = backend.new_matcher(backend.compile(key))
    assert all(reference.accept_token(t) for t in new_out)
    assert allowed_ids(backend, matcher) == allowed_ids(backend, reference)


def test_apply_jump_restores_on_refusal(backend, hf):
    matcher = backend.new_matcher(backend.compile(GrammarKey("regex", "abc[0-9]+")))
    out = encode(hf, "ab")
    assert all(matcher.accept_token(t) for t in out)
    before = allowed_ids(backend, matcher)
    bad = JumpForward(num_dropped=1, new_ids=encode(hf, "bc") + encode(hf, "z"), text="cz")
    assert not apply_jump(matcher, out, bad)
    assert allowed_ids(backend, matcher) == before
