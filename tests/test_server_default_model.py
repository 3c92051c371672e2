"""The server on the default model (SmolLM2-135M-Instruct), driven by the official `openai` client
and raw HTTP: real answers through the chat template, streaming equal to non-streaming, usage with
cached tokens, and /generate logprobs. Few requests: one decode step is slow on 2 cores."""

from __future__ import annotations

import openai
import pytest

from tests.test_server_utils import ServerProcess, post

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--max-total-tokens", "8192")
    try:
        srv.wait_ready(timeout=240)
        yield srv
    finally:
        assert srv.stop() == 0, srv.output


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_chat_answers_and_streams_the_same(client):
    model = client.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct"
    # No max_tokens: until the model ends its turn (OpenAI's default), which it does quickly here.
    kw = dict(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0)
    full = client.chat.completions.create(**kw)
    answer = full.choices[0].message.content
    assert "Paris" in answer and full.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    usage = chunks[-1].usage
    assert usage.completion_tokens == full.usage.completion_tokens
    # The same conversation again: everything but the last prompt token comes from the radix cache.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_completion_logprobs_greedy_is_top1(client):
    out = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=4,
                                    temperature=0, logprobs=2)
    c = out.choices[0]
    assert "Paris" in c.text
    for value, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert value == pytest.approx(max(top.values()), abs=1e-4)


def test_generate_batch_with_logprobs(server):
    status, outs = post(server.url + "/generate", {
        "text": ["The capital of France is", "The capital of Germany is"],
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 1})
    assert status == 200
    assert "Paris" in outs[0]["text"] and "Berlin" in outs[1]["text"]
    for out in outs:
        meta = out["meta_info"]
        assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
        assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]


def test_required_tool_call(client):
    """tool_choice "required": the output is constrained to a call, and the model fills it in sensibly
    (its chat template has no tools, so it sees the server's fallback preamble)."""
    import json

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                             "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}},
             {"type": "function", "function": {"name": "get_time", "description": "Get the time in a time zone",
              "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                             "required": ["timezone"]}}}]
    out = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=tools, tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert "Paris" in arguments["city"] and arguments["unit"] in ("celsius", "fahrenheit")
