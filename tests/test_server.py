"""A real server process on a tiny random model, driven by the official `openai` client and raw HTTP.

One module-scoped server (API key, metrics, a small KV pool); the tests share it and end with a
load test (64 concurrent streaming clients, some disconnecting) and the integrity check.
"""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest

from plait.bench.serving import http_request, sse_events
from tests.test_server_utils import ServerProcess, post, write_tiny_model

API_KEY = "test-key"
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_tokenizer):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"), default_tokenizer)
    srv = ServerProcess("--model-path", str(folder), "--dtype", "float32", "--max-total-tokens", "16384",
                        "--enable-metrics", "--served-model-name", "tiny", api_key=API_KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.output


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def generate(server, body, **kw):
    return post(server.url + "/generate", body, headers=server.headers(), **kw)


def server_info(server) -> dict:
    status, body = server.get("/get_server_info")
    assert status == 200, body
    return json.loads(body)


# ---- OpenAI API through the official client ------------------------------------------------------
def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_generate(server, client):
    prompt = "The quick brown fox"
    native = generate(server, {"text": prompt, "sampling_params": GREEDY})[1]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == native["text"]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == native["meta_info"]["prompt_tokens"]
    assert out.usage.completion_tokens == 12


def test_completion_stream_equals_non_stream_with_logprobs_and_n(client):
    kw = dict(model="tiny", prompt=["Once upon a time", "In a galaxy"], max_tokens=10, temperature=0, logprobs=3,
              n=2, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    assert full.choices[0].text == full.choices[1].text  # greedy samples of one prompt agree
    texts, tokens, values = {}, {}, {}
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs:
                tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
                values.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    for c in full.choices:
        assert texts[c.index] == c.text
        assert tokens[c.index] == c.logprobs.tokens and values[c.index] == c.logprobs.token_logprobs
        assert len(c.logprobs.tokens) == 10 and all(len(t) <= 3 for t in c.logprobs.top_logprobs)
        # greedy: the chosen token is the most likely one
        for value, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
            assert value == pytest.approx(max(top.values()), abs=1e-5)


def test_completion_echo_with_prompt_logprobs(client):
    out = client.completions.create(model="tiny", prompt="Hello there friend", max_tokens=3, temperature=0, echo=True,
                                    logprobs=1, extra_body={"ignore_eos": True})
    c = out.choices[0]
    assert c.text.startswith("Hello there friend")
    assert c.logprobs.token_logprobs[0] is None  # the first prompt token has no logprob
    assert len(c.logprobs.tokens) == out.usage.prompt_tokens + 3
    assert "".join(c.logprobs.tokens) == c.text
    assert c.logprobs.text_offset[:2] == [0, len(c.logprobs.tokens[0])]


def test_chat_stream_equals_non_stream_with_logprobs(client):
    kw = dict(model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
              max_completion_tokens=8, temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.choices[0].finish_reason == "length"
    content = full.choices[0].logprobs.content
    assert len(content) == 8 and all(len(e.top_logprobs) == 2 for e in content)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace") == msg.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_n_usage_and_cached_tokens(client):
    messages = [{"role": "user", "content": "Tell me something about caching prefixes in a radix tree."}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, n=3, temperature=0.9,
                                           seed=7)
    assert len(first.choices) == 3 and 3 <= first.usage.completion_tokens <= 15
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens  # counted once for the n samples
    details = again.usage.prompt_tokens_details
    assert details.cached_tokens >= again.usage.prompt_tokens - 1 > 0


def test_chat_seed_reproduces_and_text_parts(client):
    parts = [{"type": "text", "text": "Hello"}]
    a = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=6,
                                       temperature=1.0, seed=42)
    b = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                       temperature=1.0, seed=42)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_stop_and_extras(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Count"}], temperature=0, max_tokens=20)
    free = client.chat.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].message.content
    words = free.split()
    assert len(words) > 2
    stop = words[2]
    out = client.chat.completions.create(**kw, stop=[stop], extra_body={
        "ignore_eos": True, "top_k": 5, "min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 1,
        "regex": None, "stop_token_ids": []})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == free[: free.index(stop)]


def test_constraints_pass_through(client, server):
    out = client.completions.create(model="tiny", prompt="Digits:", max_tokens=6, temperature=0,
                                    extra_body={"regex": "[0-9]{3}"})
    assert out.choices[0].text.isdigit() and len(out.choices[0].text) == 3
    with pytest.raises(openai.BadRequestError, match="regex"):  # refused at the HTTP layer, before the scheduler
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"regex": "[0-9"})
    body = {"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 4, "regex": "[0-9"}}
    status, err = generate(server, body)
    assert status == 400 and "regex" in err["error"]["message"]


# ---- native API -------------------------------------------------------------------------------------
def test_generate_batch_n_and_input_ids(server):
    status, outs = generate(server, {"text": ["a b c", "d e f"], "sampling_params": GREEDY})
    assert status == 200 and len(outs) == 2
    for out in outs:
        assert out["meta_info"]["completion_tokens"] == 12 and len(out["output_ids"]) == 12
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    ids = post(server.url + "/tokenize", {"prompt": "a b c"}, headers=server.headers())[1]["tokens"]
    by_ids = generate(server, {"input_ids": ids, "sampling_params": GREEDY})[1]
    assert by_ids["output_ids"] == outs[0]["output_ids"]
    assert post(server.url + "/detokenize", {"tokens": ids}, headers=server.headers())[1]["text"] == "a b c"
    status, samples = generate(server, {"text": "x y", "sampling_params": {**GREEDY, "n": 3}, "rid": "nreq"})
    assert status == 200 and [s["meta_info"]["id"] for s in samples] == ["nreq_0", "nreq_1", "nreq_2"]


def test_generate_logprobs(server):
    status, out = generate(server, {
        "text": "The capital of France is", "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3, "return_text_in_logprobs": True})
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] == len(meta["output_top_logprobs"])
    for (lp, _, text), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert len(top) == 3 and top[0][0] == pytest.approx(lp, abs=1e-5) and isinstance(text, str)


def test_generate_stream_format(server):
    async def read():
        body = {"text": "Stream me", "sampling_params": GREEDY, "stream": True}
        raw = b"".join([c async for c in http_request(server.url + "/generate", body, headers=server.headers())])
        return raw

    raw = asyncio.run(read())
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events) and events[-1] == b"data: [DONE]"
    outs = [json.loads(e[6:]) for e in events[:-1]]
    texts = [o["text"] for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
    assert outs[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(o["meta_info"]["finish_reason"] is None for o in outs[:-1])
    full = generate(server, {"text": "Stream me", "sampling_params": GREEDY})[1]
    assert outs[-1]["text"] == full["text"] and outs[-1]["output_ids"] == full["output_ids"]


def test_generate_stream_interval_groups_tokens(server):
    """A request's `stream_interval`: the first token alone, then 5 at a time, the rest at the end."""
    async def read():
        body = {"text": "Stream me", "sampling_params": dict(GREEDY, stream_interval=5), "stream": True}
        return [json.loads(d) async for d in sse_events(http_request(server.url + "/generate", body,
                                                                     headers=server.headers()))]

    outs = asyncio.run(read())
    counts = [o["meta_info"]["completion_tokens"] for o in outs]
    assert counts[-1] == 12 and set(counts) <= {1, 6, 11, 12}, counts
    full = generate(server, {"text": "Stream me", "sampling_params": GREEDY})[1]
    assert outs[-1]["text"] == full["text"] and outs[-1]["output_ids"] == full["output_ids"]


def test_abort_request(server):
    async def run():
        body = {"text": "long one", "rid": "to-abort", "stream": True,
                "sampling_params": {"max_new_tokens": 900, "temperature": 0, "ignore_eos": True}}
        last = None
        async for data in sse_events(http_request(server.url + "/generate", body, headers=server.headers())):
            last = json.loads(data)
            if last["meta_info"]["completion_tokens"] == 2:
                clash = await asyncio.to_thread(generate, server, {"text": "again", "rid": "to-abort"})
                await asyncio.to_thread(post, server.url + "/abort_request", {"rid": "to-abort"},
                                        headers=server.headers())
        return last, clash

    last, clash = asyncio.run(run())
    assert clash[0] == 400 and "already running" in clash[1]["error"]["message"]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 900


def test_info_flush_and_metrics(server):
    assert server.get("/health_generate")[0] == 200  # a real one-token generation
    assert generate(server, {"text": "for the metrics", "sampling_params": GREEDY})[0] == 200
    status, body = server.get("/get_model_info")
    info = json.loads(body)
    assert status == 200 and {"model_path", "tokenizer_path", "is_generation"} <= set(info)
    state = server_info(server)["internal_states"][0]
    assert {"hit_rate", "tokens_in_cache", "evicted_tokens", "free_slots"} <= set(state["cache"])
    assert state["debug"]["integrity"]["ok"], state["debug"]
    flushed = post(server.url + "/flush_cache", {}, headers=server.headers())
    assert flushed[0] == 200
    assert server_info(server)["internal_states"][0]["cache"]["tokens_in_cache"] == 0
    status, metrics = server.get("/metrics")
    text = metrics.decode()
    assert status == 200
    for name in ("plait:num_running_reqs", "plait:num_queue_reqs", "plait:token_usage", "plait:cache_hit_rate",
                 "plait:prompt_tokens_total", "plait:generation_tokens_total",
                 "plait:time_to_first_token_seconds_count", "plait:inter_token_latency_seconds_count",
                 "plait:e2e_request_latency_seconds_count"):
        assert name in text, name
    count = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("plait:time_to_first_token_seconds_count"))
    assert count > 0


def test_api_key_required(server):
    assert post(server.url + "/generate", {"text": "x"})[0] == 401
    status, body = post(server.url + "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    import urllib.request

    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:  # health needs no key
        assert r.status == 200


# ---- bad requests: each answered with the right 4xx and a message that says what is wrong ----------
def _long_ids(n: int) -> list[int]:
    return [100 + i % 1000 for i in range(n)]


CHAT = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (name, path, body (dict, or bytes sent as is), extra headers, status, words in the message)
    ("malformed json", "/generate", b'{"text": "x",', {}, 400, "malformed JSON"),
    ("json array body", "/generate", b'[1, 2]', {}, 400, "JSON object"),
    ("empty body", "/v1/completions", b"", {}, 400, "empty"),
    ("wrong content type", "/generate", b'{"text": "x"}', {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("invalid utf-8", "/generate", b'{"text": "\xff\xfe"}', {}, 400, "UTF-8"),
    ("lone surrogate", "/generate", b'{"text": "\\ud800"}', {}, 400, "surrogate"),
    ("no prompt", "/generate", {"sampling_params": {}}, {}, 400, "text or input_ids"),
    ("text and input_ids", "/generate", {"text": "a", "input_ids": [1]}, {}, 400, "text or input_ids"),
    ("empty text", "/generate", {"text": ""}, {}, 400, "empty"),
    ("empty input_ids", "/generate", {"input_ids": []}, {}, 400, "empty"),
    ("token id outside vocab", "/generate", {"input_ids": [10**7]}, {}, 400, "vocabulary"),
    ("input_ids of strings", "/generate", {"input_ids": ["a"]}, {}, 400, "input_ids"),
    ("unknown sampling param", "/generate", {"text": "a", "sampling_params": {"max_tokens": 3}}, {}, 400,
     "max_tokens"),
    ("negative temperature", "/generate", {"text": "a", "sampling_params": {"temperature": -1}}, {}, 400,
     "temperature"),
    ("top_p zero", "/generate", {"text": "a", "sampling_params": {"top_p": 0}}, {}, 400, "top_p"),
    ("max_new_tokens as string", "/generate", {"text": "a", "sampling_params": {"max_new_tokens": "5"}}, {}, 400,
     "max_new_tokens"),
    ("prompt longer than context", "/generate", {"input_ids": _long_ids(1100)}, {}, 400, "context length"),
    ("prompt plus max_new_tokens over context", "/generate",
     {"input_ids": _long_ids(1000), "sampling_params": {"max_new_tokens": 100}}, {}, 400, "context length"),
    ("unknown field", "/generate", {"text": "a", "max_new_tokens": 5}, {}, 400, "max_new_tokens: unknown field"),
    ("unsupported image input", "/generate", {"text": "a", "image_data": "x.png"}, {}, 400, "image_data"),
    ("sampling_params list length", "/generate", {"text": ["a", "b"], "sampling_params": [{}]}, {}, 400,
     "sampling_params"),
    ("stop_token_ids outside vocab", "/generate", {"text": "a", "sampling_params": {"stop_token_ids": [10**7]}},
     {}, 400, "stop_token_ids"),
    ("too many top logprobs", "/generate", {"text": "a", "return_logprob": True, "top_logprobs_num": 1000}, {}, 400,
     "top_logprobs_num"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, {}, 404, "gpt-4"),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, {}, 400, "prompt: field required"),
    ("n zero", "/v1/completions", {"prompt": "a", "n": 0}, {}, 400, "n:"),
    ("n beyond limit", "/v1/completions", {"prompt": "a", "n": 100000}, {}, 400, "n:"),
    ("max_tokens beyond context", "/v1/completions", {"prompt": "a", "max_tokens": 100000}, {}, 400,
     "context length"),
    ("negative max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": -1}, {}, 400, "max_tokens"),
    ("temperature above 2", "/v1/completions", {"prompt": "a", "temperature": 5}, {}, 400, "temperature"),
    ("too many logprobs", "/v1/completions", {"prompt": "a", "logprobs": 50}, {}, 400, "logprobs"),
    ("stream_options without stream", "/v1/completions",
     {"prompt": "a", "stream_options": {"include_usage": True}}, {}, 400, "stream_options"),
    ("logit_bias key not a token id", "/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, {}, 400,
     "logit_bias"),
    ("logit_bias out of range", "/v1/completions", {"prompt": "a", "logit_bias": {"5": 500}}, {}, 400, "logit_bias"),
    ("logit_bias token outside vocab", "/v1/completions", {"prompt": "a", "logit_bias": {"99999999": 1}}, {}, 400,
     "logit_bias"),
    ("suffix", "/v1/completions", {"prompt": "a", "suffix": "b"}, {}, 400, "suffix"),
    ("stop of wrong type", "/v1/completions", {"prompt": "a", "stop": 5}, {}, 400, "stop"),
    ("seed as float", "/v1/completions", {"prompt": "a", "seed": 1.5}, {}, 400, "seed"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, {}, 400, "empty"),
    ("no messages", "/v1/chat/completions", {"messages": []}, {}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "role"),
    ("image content part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, {}, 400,
     "only text parts"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, {}, 400,
     "logprobs"),
    ("tools", "/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, {}, 400, "tools"),
    ("content of wrong type", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, {}, 400,
     "content"),
    ("detokenize non-ids", "/detokenize", {"tokens": ["a"]}, {}, 400, "token ids"),
    ("abort without rid", "/abort_request", {}, {}, 400, "rid"),
    ("no such endpoint", "/v2/generate", {"text": "a"}, {}, 404, "no such endpoint"),
]


@pytest.mark.parametrize("name,path,body,headers,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server, name, path, body, headers, status, words):
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data,
                                 headers={"Content-Type": "application/json", **server.headers(), **headers})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == status
    error = json.loads(info.value.read())["error"]
    assert words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_method_not_allowed(server):
    status, body = server.get("/generate")
    assert status == 405 and "not allowed" in json.loads(body)["error"]["message"]


def test_still_serving_after_bad_requests(server):
    assert len(BAD_REQUESTS) >= 25
    status, out = generate(server, {"text": "still alive?", "sampling_params": GREEDY})
    assert status == 200 and out["meta_info"]["completion_tokens"] == 12
    assert server.get("/health")[0] == 200


# ---- load: 64 streaming clients, a quarter of them hanging up early -------------------------------------
def _wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = server_info(server)["internal_states"][0]
        if state["num_running_reqs"] == 0 and state["num_queue_reqs"] == 0 and state["debug"]["integrity"]["idle"]:
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def test_load_64_streaming_clients_with_disconnects(server):
    common = "You are a helpful assistant. Answer the question in one short sentence. "
    prompts = [common + f"Question number {i}: what comes after {i * 7}?" for i in range(16)]
    max_tokens = 24
    params = {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    status, reference = generate(server, {"text": prompts, "sampling_params": params}, timeout=120)
    assert status == 200
    expected = [r["text"] for r in reference]
    headers = server.headers()

    async def native(i: int, hang_up: bool) -> str | None:
        body = {"text": prompts[i % 16], "sampling_params": params, "stream": True}
        text, events = None, 0
        async for data in sse_events(http_request(server.url + "/generate", body, headers=headers)):
            out = json.loads(data)
            text, events = out["text"], events + 1
            if hang_up and events == 3:
                return None  # leaving the loop closes the connection
            if out["meta_info"]["finish_reason"] is not None:
                assert out["meta_info"]["completion_tokens"] == max_tokens
        return text

    async def openai_style(i: int, hang_up: bool) -> str | None:
        body = {"model": "tiny", "prompt": prompts[i % 16], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        text, events, finish = "", 0, None
        async for data in sse_events(http_request(server.url + "/v1/completions", body, headers=headers)):
            choice = json.loads(data)["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            events += 1
            if hang_up and events == 3:
                return None
        assert finish == "length"
        return text

    async def run():
        jobs = [(native if i % 2 == 0 else openai_style)(i, hang_up=i % 4 == 3) for i in range(64)]
        return await asyncio.gather(*jobs)

    start_aborts = _metric(server, "plait:num_aborted_requests_total")
    results = asyncio.run(run())
    finished = [(i, text) for i, text in enumerate(results) if text is not None]
    assert len(finished) == 48
    for i, text in finished:
        assert text == expected[i % 16], f"client {i}"
    assert server.get("/health")[0] == 200
    state = _wait_idle(server)
    integrity = state["debug"]["integrity"]
    assert integrity["ok"] and integrity["leaked_slots"] == 0, integrity
    assert state["cache"]["protected_tokens"] == 0
    assert state["cache"]["free_slots"] + state["cache"]["tokens_in_cache"] == state["cache"]["total_slots"]
    assert _metric(server, "plait:num_aborted_requests_total") - start_aborts >= 8  # most hang-ups aborted early


def _metric(server, name: str) -> float:
    text = server.get("/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# ---- the serving benchmark against this server -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["sglang", "openai", "openai-chat"])
def test_bench_serving(server, backend, tmp_path):
    """sglang on generated shared prefixes, openai on random prompts, openai-chat on a ShareGPT file."""
    from plait.bench.serving import main

    out_file = tmp_path / "bench.jsonl"
    args = ["--backend", backend, "--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "8",
            "--random-input-len", "32", "--random-output-len", "8", "--request-rate", "50", "--max-concurrency", "4",
            "--output-file", str(out_file), "--warmup-requests", "1"]
    if backend == "sglang":
        args += ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2", "--gsp-prompts-per-group",
                 "4", "--gsp-system-prompt-len", "64", "--gsp-question-len", "8", "--gsp-output-len", "8"]
    if backend == "openai-chat":
        conversations = [{"conversations": [
            {"from": "human", "value": f"Question {i}: " + "tell me about the weather in spring " * (i % 3 + 1)},
            {"from": "gpt", "value": "It is usually mild and rainy, with some sunny days. " * (i % 2 + 1)}]}
            for i in range(12)]
        path = tmp_path / "sharegpt.json"
        path.write_text(json.dumps(conversations))
        args += ["--dataset-name", "sharegpt", "--dataset-path", str(path), "--sharegpt-output-len", "8"]
    record = main(args)
    assert record["completed"] == 8 and record["failed"] == 0
    assert record["total_output_tokens"] == 64 and record["num_wrong_output_len"] == 0
    assert record["ttft_ms"]["mean"] > 0 and record["e2e_latency_ms"]["p99"] >= record["e2e_latency_ms"]["median"]
    if backend == "sglang":
        assert record["cache_hit_rate"] > 0.5  # shared system prompts
    saved = json.loads(out_file.read_text().splitlines()[0])
    assert saved["bench"] == "serving" and saved["backend"] == backend


def test_bench_programs_through_the_server(server):
    """The paper's workloads (plait.bench.programs --quick) through both server paths, the native
    frontend protocol and the OpenAI API, on the workloads that use them differently (select, forks
    with cache hints, regexes, roles); then a runtime ablation recorded against the full runs."""
    from plait.bench.programs import WORKLOADS
    from plait.bench.programs.__main__ import main

    names = "hellaswag,tree_of_thought,json_decode,chat_short"
    common = ["--quick", "--base-url", server.url, "--api-key", API_KEY, "--workloads", names, "--no-warmup",
              "--num-threads", "4"]
    native = main([*common, "--backend", "endpoint", "--label", "native"])
    openai_path = main([*common, "--backend", "openai", "--label", "via-openai", "--modes", "batch"])
    assert len(native) == 8 and len(openai_path) == 4
    chat = WORKLOADS["chat_short"]
    asked = sum(sum(a["answer_tokens"]) for a in chat.make_args(chat.shape("quick"), seed=0))
    for r in native + openai_path:
        assert r["error"] is None and r["structure_ok"] and r["server"] == "plait", r
        assert r["prompt_tokens"] > 0
        if r["workload"] == "chat_short" and r["mode"] == "batch":
            assert r["output_tokens"] == asked  # exact lengths through either protocol
        if r["workload"] == "json_decode":
            assert r["valid"] is not None
        if r["workload"] == "tree_of_thought" and r["mode"] == "batch":
            assert r["hit_rate"] > 0  # branches reuse their parent's prefix (cached tokens reported by both)
            assert (r["calls"]["hints"] > 0) == (r["backend"] == "endpoint")  # the OpenAI API takes no hints
    ablated = main([*common, "--backend", "endpoint", "--label", "native", "--workloads", "tree_of_thought",
                    "--server-ablation", "no-cache"])
    assert [(r["ablation"], r["mode"], r["label"]) for r in ablated] == [("no-cache", "batch", "native")]


def test_listener_connections_have_nagle_off():
    """Connections accepted on the server's socket get TCP_NODELAY from asyncio, as uvicorn's own
    sockets do. Without it each response on a kept-alive connection (the OpenAI SDK's, any pooled
    client's) waited ~40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    from plait.runtime.server.launch import _bind

    async def accepted_nodelay() -> int:
        sock = _bind("127.0.0.1", 0)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                raw = transport.get_extra_info("socket")
                seen.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
