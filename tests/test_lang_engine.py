"""Frontend programs through the in-process Engine backend: a tiny random model with the default
tokenizer for every primitive, `select` against an argmax computed from Engine logprobs directly,
and the fork hint visible as cache hits. A few end-to-end checks on the default model are slow."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

import plait as sgl
from plait.lang.backend.engine_backend import EngineBackend
from plait.lang.interpreter import ProgramError


@functools.cache
def tiny_engine(tokenizer):
    """One tiny engine for all frontend test modules (built once per test process)."""
    import torch
    import transformers

    from plait.runtime.engine import Engine
    from tests.tiny_models import InMemorySource

    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer.hf), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024)
    torch.manual_seed(5)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return Engine(source=InMemorySource(hf, tokenizer=tokenizer), dtype="float32", device="cpu",
                  max_total_tokens=8192, debug_check_integrity=True)


@pytest.fixture(scope="module")
def engine(default_tokenizer):
    return tiny_engine(default_tokenizer)


@pytest.fixture(scope="module")
def backend(engine):
    return EngineBackend.for_engine(engine)


GREEDY = {"temperature": 0}


def mean_choice_logprob(engine, prompt: str, choice: str) -> float:
    """The reference: prompt+choice prefilled with prompt logprobs; the choice's tokens averaged."""
    tok = engine.tokenizer
    prompt_ids, full_ids = tok.encode(prompt), tok.encode(prompt + choice)
    assert full_ids[: len(prompt_ids)] == prompt_ids, "choice must not merge with the prompt's last token"
    out = engine.generate(input_ids=full_ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    values = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][len(prompt_ids):]]
    return sum(values) / len(values)


def test_engine_is_accepted_as_backend(engine, backend):
    sgl.set_default_backend(engine)
    try:
        assert sgl.lang.backend.base.as_backend(sgl.global_config.default_backend) is backend  # one per engine
        assert sgl.flush_cache() is True
        assert sgl.get_server_info()["model_path"] == "in-memory"
    finally:
        sgl.global_config.default_backend = None


def test_gen_matches_engine_and_honours_params(engine, backend):
    prompt = "The quick brown fox"

    @sgl.function
    def prog(s):
        s += prompt + sgl.gen("free", max_tokens=12, ignore_eos=True)
        s += "\n" + sgl.gen("logp", max_tokens=3, return_logprob=True, top_logprobs_num=2, ignore_eos=True)

    state = prog.run(backend=backend, **GREEDY)
    direct = engine.generate(prompt, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert state["free"] == direct["text"]
    meta = state.get_meta_info("free")
    assert meta["completion_tokens"] == 12 and meta["finish_reason"]["type"] == "length"
    lp = state.get_meta_info("logp")
    assert len(lp["output_token_logprobs"]) == 3 and len(lp["output_top_logprobs"][0]) == 2

    stop = direct["text"][4:7]  # a stop string that occurs in the free generation
    if stop.strip():
        cut = prog.run(backend=backend, stop=[stop], **GREEDY)
        assert cut["free"] == direct["text"][: direct["text"].index(stop)]


def test_min_tokens_stop_token_ids_and_n(engine, backend):
    @sgl.function
    def prog(s):
        s += "Once upon a time" + sgl.gen("a", max_tokens=6, min_tokens=6)
        s += sgl.gen("several", max_tokens=4, n=3, temperature=1.0)

    state = prog.run(backend=backend, **GREEDY)
    assert state.get_meta_info("a")["completion_tokens"] == 6
    assert isinstance(state["several"], list) and len(state["several"]) == 3
    first = engine.generate("Hi there", {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True})
    stop_id = first["output_ids"][2]

    @sgl.function
    def stopping(s):
        s += "Hi there" + sgl.gen("x", max_tokens=5, stop_token_ids=[stop_id], ignore_eos=True)

    assert stopping.run(backend=backend, **GREEDY).get_meta_info("x")["completion_tokens"] <= 3


def test_roles_use_the_models_own_template(backend):
    @sgl.function
    def chat(s):
        s += sgl.user("Hello!")
        s += sgl.assistant(sgl.gen("reply", max_tokens=4))

    state = chat.run(backend=backend, **GREEDY)
    assert state.text().startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n" in state.text()
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection"])
def test_select_agrees_with_engine_logprobs(engine, backend, method):
    prompt = "My favourite colour is"
    choices = [" red", " green", " blue sky", " purple"]

    @sgl.function
    def prog(s):
        s += prompt + sgl.select("colour", choices=choices, choices_method=getattr(sgl, method))

    state = prog.run(backend=backend)
    expected = [mean_choice_logprob(engine, prompt, c) for c in choices]
    meta = state.get_meta_info("colour")
    assert meta["normalized_prompt_logprobs"] == pytest.approx(expected, abs=1e-4)
    if method == "token_length_normalized":
        assert state["colour"] == choices[max(range(len(choices)), key=expected.__getitem__)]
    assert state.text() == prompt + state["colour"]


def test_select_is_one_engine_request(engine, backend, monkeypatch):
    """The prompt's length is counted with the engine's tokenizer (as the engine counts it), so a
    select costs one batched scoring request and no prefill-only request before it."""
    texts = ["Plain text", "Café naïve 東京 <|im_start|>user\nHi<|im_end|>\n", " leading space"]
    for text in texts:
        counted = engine.generate(text, {"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
        assert backend.prompt_len(SimpleNamespace(text_=text, images_=[])) == counted
    requests = []
    real = backend._generate
    monkeypatch.setattr(backend, "_generate", lambda body: requests.append(body) or real(body))

    @sgl.function
    def prog(s):
        s += texts[1] + sgl.select("x", choices=[" a", " b c"])

    assert prog.run(backend=backend)["x"] in (" a", " b c")
    assert len(requests) == 1 and len(requests[0]["text"]) == 3  # the prompt and its two choices, together


def test_select_unconditional(engine, backend):
    @sgl.function
    def prog(s):
        s += "Answer:" + sgl.select("a", choices=[" yes", " no way"],
                                    choices_method=sgl.unconditional_likelihood_normalized)

    meta = prog.run(backend=backend).get_meta_info("a")
    assert [len(x) for x in meta["unconditional_token_logprobs"]] == [len(x) for x in meta["input_token_logprobs"]]
    assert meta["unconditional_token_logprobs"][0][0][0] is None  # a choice's first token has no context


def test_fork_hint_shows_as_cache_hits(engine, backend):
    engine.flush_cache()
    prefix = "Here is a long shared context that every branch of the fork reads before it writes. " * 4
    prefix_tokens = len(engine.tokenizer.encode(prefix))

    @sgl.function
    def prog(s):
        s += prefix
        forks = s.fork(3)
        forks += lambda i: f"Branch {i}:" + sgl.gen("x", max_tokens=3)
        forks.join()
        return forks

    state = prog.run(backend=backend, **GREEDY)
    for branch in state.ret_value:
        assert branch.get_meta_info("x")["cached_tokens"] >= prefix_tokens - 1


def test_streaming_equals_non_streaming(backend):
    @sgl.function
    def prog(s):
        s += "Streaming test:" + sgl.gen("x", max_tokens=10, ignore_eos=True)

    full = prog.run(backend=backend, **GREEDY)["x"]
    state = prog.run(backend=backend, stream=True, **GREEDY)
    assert "".join(state.text_iter("x")) == full  # text_iter may merge pieces that arrive together
    params = sgl.lang.params.GenParams().replace(max_new_tokens=10, ignore_eos=True, temperature=0)
    deltas = list(backend.generate_stream(SimpleNamespace(text_="Streaming test:", images_=[]), params))
    assert "".join(d for d, _ in deltas) == full and len(deltas) > 1


def test_constraints_and_dtype_reach_the_engine(backend):
    @sgl.function
    def prog(s):
        s += "Number:" + sgl.gen_int("n", max_tokens=4)
        s += " Json:" + sgl.gen("j", max_tokens=4, json_schema={"type": "object"})
        s += " Regex:" + sgl.gen("r", max_tokens=4, regex="[ab]+")
        s += " String:" + sgl.gen_string("q", max_tokens=4)

    # The engine accepts the constraints (enforcing them is the grammar backend's job).
    state = prog.run(backend=backend, **GREEDY)
    assert all(isinstance(state[name], str) for name in ("n", "j", "r", "q"))


def test_engine_errors_surface(backend, tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"png")

    @sgl.function
    def prog(s):
        s += sgl.image(str(img)) + "Describe:" + sgl.gen("d", max_tokens=2)

    with pytest.raises(ProgramError, match="does not serve images"):
        prog.run(backend=backend).text()

    @sgl.function
    def bad(s):
        s += "x" + sgl.gen("d", max_tokens=2, temperature=-1)

    with pytest.raises(ProgramError, match="temperature"):
        bad.run(backend=backend)["d"]


@pytest.mark.slow
def test_default_model_end_to_end():
    from plait.runtime.engine import Engine

    with Engine(dtype="float32", device="cpu", max_total_tokens=8192) as engine:
        backend = EngineBackend(engine)

        @sgl.function
        def capital(s, country):
            s += sgl.user("What is the capital of " + country + "? Answer in one word.")
            s += sgl.assistant(sgl.gen("answer", max_tokens=12))
            s += sgl.user("Is it in Europe?")
            s += sgl.assistant(sgl.select("europe", choices=["Yes", "No"]))

        state = capital.run(country="France", backend=backend, temperature=0)
        assert "Paris" in state["answer"]
        prompt = state.text()[: state.text().rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]
        expected = {c: mean_choice_logprob(engine, prompt, c) for c in ("Yes", "No")}
        assert state["europe"] == max(expected, key=expected.get)
