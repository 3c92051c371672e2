"""Engine behaviour that needs text: stop strings across token boundaries, streaming that never
leaks a stop string, skip of special tokens, async variants. A tiny random model with the default
model's tokenizer keeps it fast."""

from __future__ import annotations

import asyncio

import pytest

from plait.runtime.engine import Engine
from tests.tiny_models import InMemorySource, tiny_hf_model


@pytest.fixture(scope="module")
def engine(default_tokenizer):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=len(default_tokenizer.hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    import torch

    torch.manual_seed(11)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    source = InMemorySource(hf, tokenizer=default_tokenizer)
    with Engine(source=source, dtype="float32", device="cpu", max_total_tokens=4096, debug_check_integrity=True) as e:
        yield e


PROMPT = "Hello there, how are you"
FREE = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}


def _stop_inside(engine, text: str, ids: list[int]) -> str:
    """A stop string that straddles a token boundary in the middle of `text`."""
    tok = engine.tokenizer
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    for i in range(5, len(ids) - 5):
        boundary = len(pieces[i])
        if 2 <= boundary < len(text) - 3 and text[boundary - 2 : boundary + 2].strip():
            return text[boundary - 2 : boundary + 2]
    pytest.skip("no suitable boundary in the generated text")


def test_stop_string_across_tokens_is_trimmed(engine):
    free = engine.generate(PROMPT, FREE)
    stop = _stop_inside(engine, free["text"], free["output_ids"])
    cut = free["text"].index(stop)
    out = engine.generate(PROMPT, {**FREE, "stop": [stop]})
    assert out["text"] == free["text"][:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = engine.generate(PROMPT, {**FREE, "stop": stop, "no_stop_trim": True})
    assert kept["text"] == free["text"][: cut + len(stop)]


def test_streaming_never_leaks_the_stop_string(engine):
    free = engine.generate(PROMPT, FREE)
    stop = _stop_inside(engine, free["text"], free["output_ids"])
    chunks = list(engine.generate(PROMPT, {**FREE, "stop": [stop]}, stream=True))
    assert all(stop not in c["text"] for c in chunks)
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, never rewritten
    assert texts[-1] == free["text"][: free["text"].index(stop)]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop"


def test_stream_equals_non_stream(engine):
    full = engine.generate(PROMPT, FREE)
    chunks = list(engine.generate(PROMPT, FREE, stream=True))
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert len(chunks) > 1


def test_text_in_logprobs(engine):
    out = engine.generate(PROMPT, {"max_new_tokens": 3, "temperature": 0}, return_logprob=True,
                          return_text_in_logprobs=True, logprob_start_len=0)
    first = out["meta_info"]["input_token_logprobs"]
    assert first[0][0] is None and isinstance(first[1][2], str)
    assert "".join(t[2] for t in first) == PROMPT
    assert len(out["meta_info"]["output_token_logprobs"]) == out["meta_info"]["completion_tokens"]


def test_async_generate_and_stream(engine):
    async def main():
        one, two = await asyncio.gather(
            engine.async_generate(PROMPT, FREE), engine.async_generate(PROMPT + "?", FREE)
        )
        chunks = [c async for c in await engine.async_generate(PROMPT, FREE, stream=True)]
        return one, two, chunks

    one, two, chunks = asyncio.run(main())
    assert one["text"] == engine.generate(PROMPT, FREE)["text"]
    assert two["meta_info"]["completion_tokens"] == 40
    assert chunks[-1]["text"] == one["text"]


def test_seeded_sampling_reproduces(engine):
    params = {"max_new_tokens": 20, "temperature": 1.0, "seed": 1234}
    a = engine.generate(PROMPT, params)
    b = engine.generate([PROMPT, "unrelated other prompt"], [params, {"max_new_tokens": 5}])[0]
    assert a["output_ids"] == b["output_ids"]


def test_min_new_tokens_keeps_early_stop_strings(engine):
    free = engine.generate(PROMPT, FREE)
    ids = free["output_ids"]
    early = engine.tokenizer.decode(ids[:2])
    stop = early[-2:] if len(early.strip()) >= 2 else early
    assert stop and stop in free["text"]
    out = engine.generate(PROMPT, {**FREE, "stop": [stop], "min_new_tokens": 10})
    assert out["meta_info"]["completion_tokens"] >= 10
    # The stop string inside the first 10 tokens does not end or trim the request.
    assert out["text"].startswith(free["text"][: len(engine.tokenizer.decode(ids[:10]))])


def test_streaming_with_min_new_tokens_never_leaks_the_stop_string(engine):
    free = engine.generate(PROMPT, FREE)
    stop = _stop_inside(engine, free["text"], free["output_ids"])
    cut = free["text"].index(stop)
    chunks = list(engine.generate(PROMPT, {**FREE, "stop": [stop], "min_new_tokens": 1}, stream=True))
    assert chunks[-1]["text"] == free["text"][:cut]
    assert all(len(c["text"]) <= cut for c in chunks)  # no piece of the stop, ever
