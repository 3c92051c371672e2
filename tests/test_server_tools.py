"""Tool calling in the OpenAI chat API, and aborting requests whose client left before any output.

Parsers are tested on crafted text (a random model writes no tool calls on its own), streamed a
character at a time against the one-shot parse. End to end, a tiny random model behind a real
server: `tool_choice` "required" and named functions must yield valid calls anyway (the output
is constrained), "auto" parses what a regex makes the model write, and the official `openai`
client reads all of it. The tiny model's chat template (SmolLM2's) does not render tools, so the
server uses its fallback preamble and the Hermes format.
"""

from __future__ import annotations

import json
import re
import socket
import time

import jsonschema
import openai
import pytest

from plait.runtime.server.protocol import ChatCompletionRequest
from plait.runtime.server.tool_parser import (
    HermesParser,
    JsonArrayParser,
    Llama3JsonParser,
    PythonicParser,
    ToolCallStream,
    merge_tool_deltas,
)
from plait.runtime.server.tools import calls_schema, detect_parser, plan_tools
from tests.test_server_utils import ServerProcess, write_tiny_model

API_KEY = "tools-key"
NAMES = {"get_weather", "add"}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                            "note": {"type": "string", "maxLength": 6}},
           "required": ["city", "days"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "boolean"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- parsers, on crafted text ---------------------------------------------------------------------------
def _stream(parser_cls, text: str) -> tuple[str, list[dict]]:
    """Content and calls as a client assembles them from deltas, feeding one character at a time."""
    stream = ToolCallStream(parser_cls(NAMES))
    content, deltas = "", []
    for end in range(len(text) + 1):
        piece, calls = stream.update(text[:end], final=False)
        content += piece
        deltas += calls
    piece, calls = stream.update(text, final=True)
    return content + piece, merge_tool_deltas(deltas + calls)


def _once(parser_cls, text: str) -> tuple[str, list[tuple[str, str]]]:
    content, deltas = ToolCallStream(parser_cls(NAMES)).update(text, final=True)
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in merge_tool_deltas(deltas)]


PARSE_CASES = [
    (HermesParser,
     ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, "}"]}}\n'
      '</tool_call>\n<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>\n'),
     "Let me check.", [("get_weather", '{"city": "Paris", "days": [1, "}"]}'), ("add", '{"a": 1}')]),
    (HermesParser, "a < b, and <tool_ is not a tag\n", "a < b, and <tool_ is not a tag\n", []),
    (HermesParser, '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> done',  # not one of the tools
     '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> done', []),
    (HermesParser, '<tool_call>{"name": "add", "arguments": "{\\"a\\": 2}"}</tool_call>', "", [("add", '{"a": 2}')]),
    (HermesParser, '<tool_call>{"name": "add", "arguments": {"a": 1', "", [("add", '{"a": 1')]),  # cut by length
    (Llama3JsonParser, '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "add", "parameters": {}}',
     "", [("get_weather", '{"city": "Oslo"}'), ("add", "{}")]),
    (Llama3JsonParser, 'Sure <|python_tag|>{"name": "add", "parameters": {"a": "x;y"}}', "Sure",
     [("add", '{"a": "x;y"}')]),
    (Llama3JsonParser, '{"name": "Ada", "age": 36}', '{"name": "Ada", "age": 36}', []),  # JSON, not a call
    (PythonicParser, '[get_weather(city="Paris", days=3), add(a=1, b=[1, "]"])]', "",
     [("get_weather", '{"city": "Paris", "days": 3}'), ("add", '{"a": 1, "b": [1, "]"]}')]),
    (PythonicParser, "[1, 2] are numbers", "[1, 2] are numbers", []),
    (JsonArrayParser, ('[{"name": "get_weather", "parameters": {"city": "Lima", "days": 2}},'
                       ' {"name": "add", "parameters": {"a": 3, "b": true}}]'),
     "", [("get_weather", '{"city": "Lima", "days": 2}'), ("add", '{"a": 3, "b": true}')]),
]


@pytest.mark.parametrize("parser_cls,text,content,calls", PARSE_CASES)
def test_parser_reads_calls_and_streams_the_same(parser_cls, text, content, calls):
    assert _once(parser_cls, text) == (content, calls)
    streamed_content, streamed = _stream(parser_cls, text)
    assert streamed_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed] == calls
    assert all(c["id"].startswith("call_") for c in streamed)


def test_parser_never_takes_back_what_it_showed():
    text = PARSE_CASES[0][1]
    parser = HermesParser(NAMES)
    previous = parser.parse("", final=False)
    for end in range(1, len(text) + 1):
        now = parser.parse(text[:end], final=end == len(text))
        assert now.content.startswith(previous.content)
        assert len(now.calls) >= len(previous.calls)
        for old, new in zip(previous.calls, now.calls):
            assert new.name == old.name and new.arguments.startswith(old.arguments)
        previous = now


def test_stream_deltas_have_openai_shape_and_parallel_limit():
    text = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{"name": "add", "arguments": {}}'
    stream = ToolCallStream(HermesParser(NAMES), max_calls=1)
    _, first = stream.update(text[:30], final=False)
    assert first == [{"index": 0, "id": first[0]["id"], "type": "function", "function": {"name": "add", "arguments": ""}}]
    _, rest = stream.update(text, final=True)
    assert rest == [{"index": 0, "function": {"arguments": '{"a": 1}'}}]  # the second call is past max_calls
    assert stream.num_calls == 1


# ---- the request side: template, fallback preamble, constraint, validation -------------------------------
TOOL_TEMPLATE = (  # a ChatML template that renders tools and calls, as tool-calling models' templates do
    "{%- if tools %}<|im_start|>system\n# Tools{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n"
    "{%- endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    '{%- for c in m.tool_calls or [] %}<tool_call>{"name": "{{ c.function.name }}", "arguments": '
    "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HISTORY = USER + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def _plan(body: dict, template: str, parser: str | None = None):
    req = ChatCompletionRequest.model_validate({"messages": HISTORY, **body})
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    return plan_tools(req, messages, chat_template=template, parser_name=parser)


def test_template_with_tools_gets_them_and_calls_as_objects(default_tokenizer):
    plan = _plan({"tools": TOOLS}, TOOL_TEMPLATE)
    assert plan.template_tools == TOOLS and plan.json_schema is None
    assert isinstance(plan.parser, HermesParser)  # the template writes <tool_call>
    prompt = default_tokenizer.hf.apply_chat_template(plan.messages, tools=plan.template_tools,
                                                      chat_template=TOOL_TEMPLATE, tokenize=False,
                                                      add_generation_prompt=True)
    assert json.dumps(TOOLS[1]) in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in prompt


def test_template_without_tools_gets_the_fallback_preamble(default_tokenizer):
    template = default_tokenizer.chat_template
    assert detect_parser(template) == "hermes"
    plan = _plan({"tools": TOOLS, "tool_choice": "auto"}, template)
    assert plan.template_tools is None
    prompt = default_tokenizer.hf.apply_chat_template(plan.messages, chat_template=template, tokenize=False)
    system = prompt.split("<|im_end|>")[0]
    assert json.dumps(TOOLS[0]) in system and HermesParser.instructions in system
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
           "</tool_call><|im_end|>" in prompt
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in prompt


def test_required_and_named_constrain_to_valid_calls(default_tokenizer):
    plan = _plan({"tools": TOOLS, "tool_choice": "required"}, default_tokenizer.chat_template)
    schema = json.loads(plan.json_schema)
    jsonschema.validate([{"name": "add", "parameters": {"a": 3, "b": False}},
                         {"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}], schema)
    for bad in ([], [{"name": "add", "parameters": {"a": 300, "b": False}}], [{"name": "rm", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    named = _plan({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}},
                  default_tokenizer.chat_template)
    schema = json.loads(named.json_schema)
    jsonschema.validate([{"name": "add", "parameters": {"a": 3, "b": True}}], schema)
    with pytest.raises(jsonschema.ValidationError):  # one call, and only to the named function
        jsonschema.validate([{"name": "add", "parameters": {"a": 3, "b": True}}] * 2, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}], schema)


def test_schema_definitions_move_to_the_top():
    from plait.runtime.server.protocol import ToolDefinition

    tool = ToolDefinition.model_validate({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/Point"}}, "required": ["p"],
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}}})
    schema = calls_schema([tool], max_calls=None)
    assert "Point" in schema["$defs"]
    jsonschema.validate([{"name": "f", "parameters": {"p": {"x": 1}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "parameters": {"p": {"x": "one"}}}], schema)


def test_auto_without_a_known_format_asks_for_the_flag():
    from plait.runtime.server.protocol import ApiError

    odd = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}[TOOLS]{% endif %}"
    with pytest.raises(ApiError, match="--tool-call-parser"):
        _plan({"tools": TOOLS}, odd)
    assert isinstance(_plan({"tools": TOOLS}, odd, parser="pythonic").parser, PythonicParser)


# ---- end to end: a tiny random model behind a real server -------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, default_tokenizer):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"), default_tokenizer, max_position_embeddings=8192)
    srv = ServerProcess("--model-path", str(folder), "--dtype", "float32", "--max-total-tokens", "16384",
                        "--max-running-requests", "1", "--enable-metrics", "--served-model-name", "tiny",
                        api_key=API_KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.output


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_gives_valid_calls_from_a_random_model(client):
    out = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, n=4, temperature=1.0, seed=7, max_tokens=80)
    names = set()
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0])
        names.add(choice.message.tool_calls[0].function.name)
    assert names <= NAMES


def test_named_function_streams_like_non_streaming(client):
    kw = dict(model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=80,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    full = client.chat.completions.create(**kw).choices[0]
    assert full.finish_reason == "tool_calls" and len(full.message.tool_calls) == 1
    call = full.message.tool_calls[0]
    assert call.function.name == "get_weather"
    _check_call(call)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 2  # the arguments arrive in pieces
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0


def test_auto_parses_what_the_model_writes(client):
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": true}}\n</tool_call>'
    kw = dict(model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=80,
              extra_body={"regex": "On it\\. " + re.escape(call)})
    full = client.chat.completions.create(**kw).choices[0]
    assert full.finish_reason == "tool_calls" and full.message.content == "On it."
    assert [(c.function.name, c.function.arguments) for c in full.message.tool_calls] == [("add", '{"a": 4, "b": true}')]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    arguments = "".join(d.function.arguments for c in chunks for d in c.choices[0].delta.tool_calls or [])
    assert (content, arguments) == ("On it.", '{"a": 4, "b": true}')
    # Without tools (or with tool_choice "none") the same text is just text.
    plain = client.chat.completions.create(**{**kw, "tool_choice": "none"}).choices[0]
    assert plain.message.tool_calls is None and plain.message.content == "On it. " + call
    assert plain.finish_reason == "stop"


def test_conversation_with_calls_and_results(client):
    out = client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, temperature=0, max_tokens=80)
    _check_call(out.choices[0].message.tool_calls[0])
    no_history = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, temperature=0, max_tokens=80)
    assert out.usage.prompt_tokens > no_history.usage.prompt_tokens + 20  # the call and result were rendered


BAD_TOOL_REQUESTS = [
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "a string"}}]}, "parameters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "unique"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "a(?=b)"}}}}}], "tool_choice": "required"}, "look-around"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "add", "arguments": "{not json"}}]}, *USER]}, "not valid JSON"),
]


@pytest.mark.parametrize("body,words", BAD_TOOL_REQUESTS)
def test_bad_tool_requests_are_400(client, body, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": "tiny", "messages": USER, "max_tokens": 4, **body})
    error = info.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    assert words.lower() in error["message"].lower(), error


# ---- a client that leaves before its first byte ----------------------------------------------------------------
def _server_state(server) -> dict:
    return json.loads(server.get("/get_server_info")[1])["internal_states"][0]


def _wait_for(server, condition, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = _server_state(server)
        if condition(state):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def _aborted(server) -> float:
    text = server.get("/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("plait:num_aborted_requests"))


def _send(server, path: str, body: dict) -> socket.socket:
    """A request whose response nobody will read: the socket is closed to leave."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_clients_gone_before_any_output_abort_their_requests(server):
    """One long request runs (--max-running-requests 1); two more wait in the queue, so they have
    produced nothing when their clients leave. They must leave the queue at once, and the running
    one must stop when its (non-streaming) client leaves, with no KV slot leaked."""
    long_chat = {"model": "tiny", "messages": USER, "max_tokens": 6000, "ignore_eos": True}
    aborted = _aborted(server)
    running = _send(server, "/v1/chat/completions", long_chat)
    _wait_for(server, lambda s: s["num_running_reqs"] == 1)
    queued = [_send(server, "/v1/chat/completions", {**long_chat, "stream": True}),
              _send(server, "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 6000, "ignore_eos": True}})]
    _wait_for(server, lambda s: s["num_queue_reqs"] == 2)
    for sock in queued:
        sock.close()
    state = _wait_for(server, lambda s: s["num_queue_reqs"] == 0)
    assert state["num_running_reqs"] == 1  # still decoding: the queued ones were dropped, not served
    running.close()
    state = _wait_for(server, lambda s: s["num_running_reqs"] == 0 and s["debug"]["integrity"]["idle"])
    integrity = state["debug"]["integrity"]
    assert integrity["ok"] and integrity["leaked_slots"] == 0, integrity
    assert _aborted(server) - aborted == 3
    assert server.get("/health")[0] == 200


def test_event_stream_aborts_on_disconnect_before_any_chunk():
    """Under ASGI 2.4 Starlette notices a gone client only when a write fails, and a queued request
    writes nothing; EventStream watches the connection itself and finishes (aborts) the group."""
    import asyncio

    from plait.runtime.server.app import EventStream

    async def run() -> list[str]:
        aborted = asyncio.Event()
        events: list[str] = []

        class State:  # ServerState.finish aborts the group's unfinished requests
            def finish(self, group):
                events.append("finish")
                aborted.set()

        async def chunks():
            await aborted.wait()  # the scheduler answers an abort with the requests' last outputs
            yield b"data: [DONE]\n\n"

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            events.append(message["type"])

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}
        await asyncio.wait_for(EventStream(chunks(), State(), object())(scope, receive, send), timeout=5)
        return events

    events = asyncio.run(run())
    assert events[:2] == ["http.response.start", "finish"]
