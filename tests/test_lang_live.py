"""The frontend language end to end against a real server process on a tiny random model.

One module-scoped server (no API key); programs reach it through `RuntimeEndpoint` (the native
`/generate` protocol) and through `OpenAI` on its own `/v1` endpoint. References: `/generate`
called directly (greedy text, prompt logprobs for `select`) and the prefix length for the fork hint.
"""

from __future__ import annotations

import re

import pytest

import plait as sgl
from tests.test_server_utils import ServerProcess, post, write_tiny_model

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_tokenizer):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"), default_tokenizer)
    srv = ServerProcess("--model-path", str(folder), "--dtype", "float32", "--max-total-tokens", "8192",
                        "--served-model-name", "tiny")
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.output


@pytest.fixture(scope="module")
def backend(server):
    return sgl.RuntimeEndpoint(server.url, timeout=60)


def generate(server, body):
    status, out = post(server.url + "/generate", body, headers=server.headers())
    assert status == 200, out
    return out


def mean_choice_logprob(server, tokenizer, prompt: str, choice: str) -> float:
    """The reference: prompt+choice prefilled over HTTP with prompt logprobs; the choice's tokens averaged."""
    prompt_ids, full_ids = tokenizer.encode(prompt), tokenizer.encode(prompt + choice)
    assert full_ids[: len(prompt_ids)] == prompt_ids, "choice must not merge with the prompt's last token"
    out = generate(server, {"input_ids": full_ids, "sampling_params": {"max_new_tokens": 0},
                            "return_logprob": True, "logprob_start_len": 0})
    entries = out["meta_info"]["input_token_logprobs"]
    assert len(entries) == len(full_ids)
    values = [e[0] for e in entries[len(prompt_ids):]]
    return sum(values) / len(values)


def test_gen_roles_variables_and_run_batch(server, backend):
    @sgl.function
    def chat(s, question):
        s += sgl.system("You are terse.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=6, ignore_eos=True))
        s += sgl.user("And then?")
        s += sgl.assistant(sgl.gen("more", max_tokens=4, ignore_eos=True))

    # The tiny model's folder name matches no chat-template rule: the role template comes from the
    # tokenizer's own template, which /get_model_info sends.
    state = chat.run(question="What is up?", backend=backend, **GREEDY)
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert "<|im_start|>user\nWhat is up?<|im_end|>\n<|im_start|>assistant\n" in state.text()
    assert state.get_meta_info("answer")["completion_tokens"] == 6
    # A message's content is the role's text, left-stripped (as in SGLang).
    assert [state.messages()[i]["content"] for i in (2, 4)] == [state["answer"].lstrip(), state["more"].lstrip()]
    # The first gen is exactly what /generate answers for the same transcript.
    prefix = state.text()[: state.text().index(state["answer"], state.text().index("What is up?"))]
    direct = generate(server, {"text": prefix, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                                    "ignore_eos": True}})
    assert direct["text"] == state["answer"]

    @sgl.function
    def echo(s, word):
        s += "Repeat " + word + ":" + sgl.gen("x", max_tokens=5, ignore_eos=True)

    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    states = echo.run_batch([{"word": w} for w in words], backend=backend, num_threads=3, **GREEDY)
    assert [st.text().split(":")[0] for st in states] == [f"Repeat {w}" for w in words]
    singles = [echo.run(word=w, backend=backend, **GREEDY)["x"] for w in words]
    assert [st["x"] for st in states] == singles


def test_fork_hint_shows_as_cache_hits(backend, default_tokenizer):
    assert backend.flush_cache()
    prefix = "Here is a long shared context that every branch of the fork reads before it writes. " * 4
    prefix_tokens = len(default_tokenizer.encode(prefix))
    assert prefix_tokens >= 64

    @sgl.function
    def prog(s):
        s += prefix
        forks = s.fork(3)
        forks += lambda i: f"Branch {i}:" + sgl.gen("x", max_tokens=3)
        forks.join()
        return forks

    state = prog.run(backend=backend, **GREEDY)
    for branch in state.ret_value:
        assert branch.get_meta_info("x")["cached_tokens"] >= prefix_tokens - 3


def test_select_agrees_with_http_logprobs(server, backend, default_tokenizer):
    prompt = "My favourite colour is"
    choices = [" red", " green", " blue sky", " purple"]

    @sgl.function
    def prog(s):
        s += prompt + sgl.select("colour", choices=choices)

    state = prog.run(backend=backend)
    expected = [mean_choice_logprob(server, default_tokenizer, prompt, c) for c in choices]
    assert state.get_meta_info("colour")["normalized_prompt_logprobs"] == pytest.approx(expected, abs=1e-4)
    assert state["colour"] == choices[max(range(len(choices)), key=expected.__getitem__)]
    assert state.text() == prompt + state["colour"]


def test_streaming_equals_non_streaming(backend):
    @sgl.function
    def prog(s):
        s += "Streaming test:" + sgl.gen("x", max_tokens=10, ignore_eos=True)

    full = prog.run(backend=backend, **GREEDY)["x"]
    state = prog.run(backend=backend, stream=True, **GREEDY)
    pieces = list(state.text_iter("x"))
    assert "".join(pieces) == full and len(full) > 0
    assert state["x"] == full


def test_regex_is_enforced_over_http(backend):
    pattern = r"(yes|no)-[0-9]{2}"

    @sgl.function
    def prog(s):
        s += "Answer:" + sgl.gen("r", max_tokens=16, regex=pattern)

    for temperature in (0, 1.0):
        value = prog.run(backend=backend, temperature=temperature)["r"]
        assert re.fullmatch(pattern, value), value


def test_api_speculative_execution_saves_calls(server, default_tokenizer):
    prompt = "Facts about the moon. "
    # Stop strings the tiny model is sure to write: pieces of its own greedy continuation, in order.
    greedy = generate(server, {"text": prompt, "sampling_params": {"max_new_tokens": 64, "temperature": 0,
                                                                    "ignore_eos": True}})["text"]
    stops, pos = [], 3
    for _ in range(3):
        stop = next((greedy[i:i + 2] for i in range(pos, len(greedy) - 2) if greedy[i:i + 2].strip()), None)
        assert stop is not None, greedy
        stops.append(stop)
        pos = greedy.index(stop, pos) + len(stop) + 3

    def program(s):
        s += prompt
        for name, stop in zip("abc", stops, strict=True):
            s += sgl.gen(name, max_tokens=16, stop=stop) + stop

    results = {}
    for spec in (None, 64):
        backend = sgl.OpenAI("tiny", is_chat_model=False, base_url=server.url + "/v1", api_key="EMPTY",
                             max_retries=1)
        calls = []
        original = backend.generate

        def counting(s, params, original=original, calls=calls):
            calls.append(params.sampling.max_new_tokens)
            return original(s, params)

        backend.generate = counting
        fn = sgl.function(num_api_spec_tokens=spec)(program)
        state = fn.run(backend=backend, **GREEDY)
        assert all(isinstance(state[name], str) for name in "abc")
        assert state.text().startswith(prompt)
        results[spec] = (len(calls), backend.token_usage.prompt_tokens, state)

    plain_calls, plain_prompt_tokens, _ = results[None]
    spec_calls, spec_prompt_tokens, spec_state = results[64]
    assert plain_calls == 3
    assert spec_calls == 1, (stops, greedy)
    assert spec_prompt_tokens < plain_prompt_tokens
    # The one speculative answer, cut at the stops, is the greedy continuation itself.
    assert spec_state.text()[len(prompt):] == greedy[: len(spec_state.text()) - len(prompt)]
