"""One request path: hostile input through the HTTP server and the in-process Engine.

Each test here reproduces a way a bad request used to crash the Engine, stall or mislead the
server, or hit the wrong request, and checks the clear 4xx (or the right behaviour) instead. One
module-scoped server on a tiny random model (with the default model's tokenizer) serves them; the
Engine tests load the same model folder in-process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from plait.bench.serving import http_request, sse_events
from plait.runtime.engine import Engine
from plait.runtime.frontend.errors import InvalidRequestError, RequestError, RequestFailed, SchedulerUnavailable
from tests.test_server_utils import ServerProcess, post, write_tiny_model

BODY_LIMIT = 1 << 20  # bytes; a body this size takes about a second to tokenize on a CPU
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, default_tokenizer):
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny"), default_tokenizer))


@pytest.fixture(scope="module")
def server(model_folder):
    srv = ServerProcess("--model-path", model_folder, "--dtype", "float32", "--max-total-tokens", "16384",
                        "--enable-metrics", "--max-request-body-bytes", str(BODY_LIMIT))
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.output


@pytest.fixture(scope="module")
def engine(model_folder):
    with Engine(model_folder, dtype="float32", max_total_tokens=16384) as eng:
        yield eng


def generate(server, body, **kw):
    return post(server.url + "/generate", body, **kw)


def raw_request(url: str, data: bytes, *, method: str = "POST", timeout: float = 60) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def error_message(body) -> str:
    return body["error"]["message"]


def assert_still_serving(server) -> None:
    status, out = generate(server, {"text": "still fine?", "sampling_params": GREEDY})
    assert status == 200 and out["meta_info"]["completion_tokens"] == 6, out
    assert server.get("/health")[0] == 200


# ---- 1. one bad call used to stop the Engine for good ------------------------------------------------
ENGINE_BAD_CALLS = [
    ({"sampling_params": {"max_new_tokens": 4, "logit_bias": {"999999999": 1}}}, "logit_bias"),
    ({"sampling_params": {"max_new_tokens": 4, "logit_bias": {"-1": 1}}}, "logit_bias"),
    ({"sampling_params": {"max_new_tokens": 4}, "return_logprob": True, "token_ids_logprob": [10**9]},
     "token_ids_logprob"),
    ({"sampling_params": {"max_new_tokens": 4}, "return_logprob": True, "token_ids_logprob": [-1]},
     "token_ids_logprob"),
    ({"sampling_params": {"max_new_tokens": 4}, "return_logprob": True, "top_logprobs_num": 10**6},
     "top_logprobs_num"),
    ({"sampling_params": {"max_new_tokens": 10**6}}, "context length"),
    ({"sampling_params": {"max_new_tokens": 4, "stop_token_ids": [10**7]}}, "stop_token_ids"),
]


def test_engine_refuses_bad_calls_and_keeps_working(engine):
    for kwargs, words in ENGINE_BAD_CALLS:
        with pytest.raises(InvalidRequestError, match=words):
            engine.generate("Hi", **kwargs)
        out = engine.generate("Hi", {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert out["meta_info"]["completion_tokens"] == 4, kwargs


def test_scheduler_rejects_what_skips_the_front_end_and_runs_on(engine):
    """The scheduler's defensive check: a request sent without `prepare` fails alone, with a 400."""
    from plait.runtime.frontend.messages import GenerateRequest
    from plait.runtime.frontend.tracker import RequestState
    from plait.sampling_params import SamplingParams

    bad = [
        SamplingParams(max_new_tokens=4, logit_bias={10**9: 1.0}),
        SamplingParams(max_new_tokens=4, stop_token_ids=[10**8]),
        SamplingParams(max_new_tokens=10**6),
    ]
    for i, params in enumerate(bad):
        state = RequestState(GenerateRequest(rid=f"raw{i}", input_ids=[1, 2, 3], sampling_params=params), None)
        group = engine.front.submit([state])
        group.sync_wait()
        error = state.error()
        assert isinstance(error, InvalidRequestError) and error.status == 400, state.meta
    state = RequestState(GenerateRequest(rid="raw-lp", input_ids=[1, 2, 3], sampling_params=SamplingParams(
        max_new_tokens=2), return_logprob=True, token_ids_logprob=[-5]), None)
    engine.front.submit([state]).sync_wait()
    assert "token_ids_logprob" in str(state.error())
    out = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 3, "ignore_eos": True})
    assert out["meta_info"]["completion_tokens"] == 3


# ---- 2. a large body used to block the server -------------------------------------------------------------
def _send_raw(server, head: bytes, body: bytes) -> bytes:
    """Send a request as bytes and read the answer; the server may answer (and close) before the
    body is all sent, as it should for a body it refuses by its size."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        try:
            sock.sendall(head + body)
        except OSError:
            pass  # refused early: the answer is waiting
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_body_over_the_limit_is_413(server):
    body = json.dumps({"text": "x" * BODY_LIMIT}).encode()
    # Refused by its Content-Length, before it is read.
    head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    answer = _send_raw(server, head, b"")
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer, answer[:300]
    # Without a Content-Length (chunked): refused as it streams in past the limit.
    head = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                       for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    answer = _send_raw(server, head, chunked)
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer, answer[:300]
    assert_still_serving(server)


def _preparing(server) -> float:
    text = server.get("/metrics", timeout=10)[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("plait:num_preparing_reqs"))


def test_health_answers_within_100ms_while_a_max_size_body_is_tokenized(server):
    words = "the quick brown fox jumps over the lazy dog "
    text = words * ((BODY_LIMIT - 100) // len(words))
    body = json.dumps({"text": text, "sampling_params": {"max_new_tokens": 1}}).encode()
    assert len(body) <= BODY_LIMIT
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=raw_request(server.url + "/generate", body)))
    thread.start()
    deadline = time.monotonic() + 30
    while _preparing(server) < 1:  # the body arrived and is being parsed and tokenized
        assert time.monotonic() < deadline and thread.is_alive(), "the request was never seen in preparation"
        time.sleep(0.005)
    latencies = []
    while thread.is_alive() and len(latencies) < 20:
        start = time.perf_counter()
        status = server.get("/health", timeout=10)[0]
        elapsed = time.perf_counter() - start
        if _preparing(server) < 1:
            break  # tokenization ended during this probe: it does not count
        assert status == 200
        latencies.append(elapsed)
    thread.join(60)
    status, _, answer = result["r"]
    assert status == 400 and "context length" in json.loads(answer)["error"]["message"]  # it was tokenized
    assert len(latencies) >= 3, latencies  # the window was long enough to measure
    # Probes ran while the tokenization was provably in progress; blocked on it they would take seconds.
    assert sorted(latencies)[len(latencies) // 2] < 0.1, latencies
    assert max(latencies) < 0.5, latencies


# ---- 4. internal errors used to be reported as success ---------------------------------------------------
HUGE_REGEX = "(c{1000}){1000}"


def test_grammar_engine_limits_are_400_before_generation(server, engine):
    params = {"max_new_tokens": 8, "regex": HUGE_REGEX}
    status, body = generate(server, {"text": "Hello", "sampling_params": params})
    assert status == 400 and "regex" in error_message(body), body
    status, _, raw = raw_request(server.url + "/generate",
                                 json.dumps({"text": "Hello", "sampling_params": params, "stream": True}).encode())
    assert status == 400 and "regex" in json.loads(raw)["error"]["message"]
    status, body = post(server.url + "/v1/completions", {"prompt": "Hello", "max_tokens": 8, "regex": HUGE_REGEX})
    assert status == 400 and "regex" in error_message(body), body
    with pytest.raises(InvalidRequestError, match="regex"):
        engine.generate("Hello", params)
    assert_still_serving(server)


# ---- 5. 5xx on bad input ------------------------------------------------------------------------------------
def test_deep_json_is_400(server):
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, headers, body = raw_request(server.url + "/generate", deep)
    assert status == 400 and headers["content-type"] == "application/json"
    assert "deeper" in json.loads(body)["error"]["message"]
    shallow_but_over = b'{"text": "a", "sampling_params": {"custom_params": ' + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"}}"
    status, _, body = raw_request(server.url + "/generate", shallow_but_over)
    assert status == 400 and "deeper" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("bias", [3, [1], "5", 1.5])
def test_logit_bias_of_the_wrong_type_is_400(server, engine, bias):
    body = {"text": "a", "sampling_params": {"max_new_tokens": 2, "logit_bias": bias}}
    status, answer = generate(server, body)
    assert status == 400 and "logit_bias" in error_message(answer), answer
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.generate("a", body["sampling_params"])


# ---- 6. abort by exact rid ---------------------------------------------------------------------------------------
def test_abort_hits_exactly_the_rid_and_its_n_copies(server):
    long = {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}

    async def run():
        async def stream(body: dict) -> dict:
            last = {}
            async for data in sse_events(http_request(server.url + "/generate", {**body, "stream": True})):
                last = json.loads(data)
            return last

        async def abort_when_started() -> list:
            aborted = []
            for _ in range(600):
                await asyncio.sleep(0.05)
                info = json.loads((await asyncio.to_thread(server.get, "/get_server_info"))[1])
                if info["internal_states"][0]["num_running_reqs"] >= 4:
                    break
            for rid in ("job", "multi"):
                status, out = await asyncio.to_thread(post, server.url + "/abort_request", {"rid": rid})
                assert status == 200
                aborted.append(sorted(out["aborted"]))
            return aborted

        return await asyncio.gather(
            stream({"text": "first", "rid": "job", "sampling_params": long}),
            stream({"text": "second", "rid": "job_2024", "sampling_params": {**long, "max_new_tokens": 60}}),
            generate_n(), abort_when_started())

    async def generate_n():
        body = {"text": "third", "rid": "multi", "sampling_params": {**long, "n": 2}}
        return (await asyncio.to_thread(generate, server, body))[1]

    job, job_2024, multi, aborted = asyncio.run(run())
    assert aborted == [["job"], ["multi_0", "multi_1"]]
    assert job["meta_info"]["finish_reason"]["type"] == "abort"
    assert job_2024["meta_info"]["finish_reason"] == {"type": "length", "length": 60}  # not touched
    assert [m["meta_info"]["finish_reason"]["type"] for m in multi] == ["abort", "abort"]


# ---- 7. the native API refuses what the OpenAI API refuses ---------------------------------------------------
NATIVE_REFUSED = [
    ("temperature NaN", b'{"text": "a", "sampling_params": {"temperature": NaN}}', "JSON"),
    ("temperature Infinity", b'{"text": "a", "sampling_params": {"temperature": Infinity}}', "JSON"),
    ("logit_bias 1e308", {"text": "a", "sampling_params": {"logit_bias": {"5": 1e308}}}, "logit_bias"),
    ("logprob_start_len huge", {"text": "a", "return_logprob": True, "logprob_start_len": 10**9}, "logprob_start_len"),
    ("logprob_start_len negative", {"text": "a", "return_logprob": True, "logprob_start_len": -100},
     "logprob_start_len"),
    ("top_k huge", {"text": "a", "sampling_params": {"top_k": 10**20}}, "top_k"),
    ("empty stop string", {"text": "a", "sampling_params": {"stop": [""]}}, "stop"),
    ("ten thousand stop strings", {"text": "a", "sampling_params": {"stop": [f"s{i}" for i in range(10**4)]}},
     "stop"),
    ("empty ebnf", {"text": "a", "sampling_params": {"max_new_tokens": 4, "ebnf": "root ::= "}}, "ebnf"),
    ("5000-digit logit_bias key", {"text": "a", "sampling_params": {"logit_bias": {"7" * 5000: 1}}}, "token ids"),
]


@pytest.mark.parametrize("name,body,words", NATIVE_REFUSED, ids=[c[0] for c in NATIVE_REFUSED])
def test_native_api_refuses_out_of_range_values(server, name, body, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, headers, raw = raw_request(server.url + "/generate", data)
    assert status == 400, raw
    message = json.loads(raw)["error"]["message"]
    assert words in message, message
    assert "Exceeds the limit" not in message  # Python's own int-conversion message


def test_engine_refuses_the_same_values(engine):
    python_only = {"temperature NaN": float("nan"), "temperature Infinity": float("inf")}
    for name, body, words in NATIVE_REFUSED:
        if isinstance(body, bytes):  # NaN and Infinity are not JSON, but a Python caller can pass them
            body, words = {"text": "a", "sampling_params": {"temperature": python_only[name]}}, "temperature"
        kwargs = {("prompt" if k == "text" else k): v for k, v in body.items()}
        with pytest.raises(InvalidRequestError, match=words):
            engine.generate(**kwargs)


# ---- 9. the smaller ones ----------------------------------------------------------------------------------------
def test_405_has_allow_and_health_has_a_json_body(server):
    status, headers, body = raw_request(server.url + "/generate", None, method="GET")
    assert status == 405 and set(headers["allow"].replace(" ", "").split(",")) == {"POST", "PUT"}
    status, headers, body = raw_request(server.url + "/health", None, method="GET")
    assert status == 200 and headers["content-type"] == "application/json" and json.loads(body) == {"status": "ok"}


def test_openapi_describes_every_request_body(server):
    status, body = server.get("/openapi.json")
    spec = json.loads(body)
    schemas = spec["components"]["schemas"]
    expected = {("/generate", "post"): "GenerateReqInput", ("/v1/completions", "post"): "CompletionRequest",
                ("/v1/chat/completions", "post"): "ChatCompletionRequest",
                ("/abort_request", "post"): "AbortRequestBody", ("/tokenize", "post"): "TokenizeRequest",
                ("/detokenize", "post"): "DetokenizeRequest"}
    for (path, method), name in expected.items():
        ref = spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{name}"
        assert "properties" in schemas[name]
    assert {"text", "input_ids", "sampling_params", "rid"} <= set(schemas["GenerateReqInput"]["properties"])
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    for ref in _refs(spec):  # every reference resolves
        assert ref.split("/")[-1] in schemas, ref


def _refs(value):
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)


def test_get_tokenizer_reads_the_default_models_gguf(default_tokenizer):
    from plait.lang.backend.runtime import Runtime
    from plait.runtime.model_loader import resolve_model

    class Endpoint:  # what a Runtime's endpoint reports for a server on the default model
        model_info = {"model_path": resolve_model(None).path, "tokenizer_path": None}

    runtime = object.__new__(Runtime)  # the method only asks the endpoint; no server needed
    runtime.endpoint = Endpoint()
    hf = runtime.get_tokenizer()
    assert hf.encode("Hello, world!") == default_tokenizer.encode("Hello, world!")


# ---- one path: the Engine and HTTP give the same outcome ------------------------------------------------------
SEQUENCE = [
    {"text": "The same answer", "sampling_params": GREEDY},
    {"text": "a", "sampling_params": {"temperature": -1}},
    {"text": ["one", "two"], "sampling_params": GREEDY},
    {"input_ids": [1, 2, 10**7]},
    {"text": "a", "sampling_params": {"max_new_tokens": 10**6}},
    {"text": "abc", "sampling_params": {**GREEDY, "n": 2}, "rid": "same"},
    {"text": "a", "sampling_params": {"tempurature": 1}},
    {"text": "a", "return_logprob": True, "top_logprobs_num": 100},
    {"text": "", "sampling_params": GREEDY},
    {"text": "a", "input_ids": [1]},
    {"text": "Logprobs too", "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 2},
    {"text": "a", "sampling_params": {"max_new_tokens": 4, "regex": "[0-9"}},
    {"text": "a", "sampling_params": {"max_new_tokens": 4, "regex": HUGE_REGEX}},
    {"text": "a", "sampling_params": {"logit_bias": {"5": 500}}},
    {"text": "Digits:", "sampling_params": {"max_new_tokens": 4, "temperature": 0, "regex": "[0-9]{3}"}},
    {"text": ["a", "b"], "sampling_params": [{}]},
    {"text": "a", "rid": ""},
    {"text": "a", "image_data": "x.png"},
]


def _engine_outcome(engine, body: dict) -> tuple:
    kwargs = {("prompt" if k == "text" else k): v for k, v in body.items()}
    try:
        if "image_data" in kwargs:  # not an Engine argument: the Engine reads the same input model
            out = engine.front.prepare(body)
            raise AssertionError(f"accepted {out}")
        out = engine.generate(**kwargs)
    except RequestError as e:
        return type(e).__name__, str(e)
    outs = out if isinstance(out, list) else [out]
    return "ok", [(o["text"], o["output_ids"], o["meta_info"]["finish_reason"]) for o in outs]


_STATUS_CLASS = {400: InvalidRequestError, 500: RequestFailed, 503: SchedulerUnavailable}


def _http_outcome(server, body: dict) -> tuple:
    status, out = generate(server, body)
    if status != 200:
        return _STATUS_CLASS[status].__name__, error_message(out)
    outs = out if isinstance(out, list) else [out]
    return "ok", [(o["text"], o["output_ids"], o["meta_info"]["finish_reason"]) for o in outs]


def test_engine_and_http_give_the_same_outcome(server, engine):
    outcomes = [(_engine_outcome(engine, body), _http_outcome(server, body)) for body in SEQUENCE]
    for body, (local, remote) in zip(SEQUENCE, outcomes):
        assert local == remote, body
    kinds = [local[0] for local, _ in outcomes]
    assert kinds.count("ok") >= 5 and kinds.count("InvalidRequestError") >= 10, kinds


# ---- a schema-driven fuzz of the whole HTTP API ---------------------------------------------------------------
def test_fuzz_from_the_request_schemas_gives_no_5xx(server):
    """Bodies generated from the OpenAPI document's request schemas (the same pydantic models the
    server parses with), and sampling parameters from the `SamplingParams` dataclass, some of them
    mutated into wrong types; every answer must be below 500 and the server healthy after."""
    from tests.fuzz_requests import run_fuzz

    spec = json.loads(server.get("/openapi.json")[1])
    results = run_fuzz(server.url, spec, max_examples=40, time_budget_s=100)
    fives = [(path, body, status, answer) for path, body, status, answer in results if status >= 500]
    assert not fives, fives[:3]
    statuses = {status for _, _, status, _ in results}
    assert 200 in statuses and 400 in statuses, statuses  # it reached both the model and the validation
    assert len(results) >= 100
    assert_still_serving(server)
    info = json.loads(server.get("/get_server_info")[1])["internal_states"][0]
    deadline = time.monotonic() + 30
    while not info["debug"]["integrity"]["idle"] and time.monotonic() < deadline:
        time.sleep(0.2)
        info = json.loads(server.get("/get_server_info")[1])["internal_states"][0]
    assert info["debug"]["integrity"]["ok"] and info["debug"]["integrity"]["leaked_slots"] == 0, info["debug"]


# ---- one server-info shape ----------------------------------------------------------------------------------
def test_engine_and_http_server_info_have_one_shape(server, engine):
    remote = json.loads(server.get("/get_server_info")[1])
    local = engine.get_server_info()
    server_only = {"host", "port", "tp_size", "dp_size", "load_balance_method", "nnodes", "node_rank", "dist_init_addr",
                   "served_model_name", "log_level", "log_requests",
                   "enable_metrics", "stats_log_interval", "shutdown_timeout", "health_check_timeout",
                   "tool_call_parser", "max_request_body_bytes"}
    assert set(remote) - set(local) == server_only
    assert set(local) <= set(remote)
    assert "api_key" not in remote
    for info in (local, remote):
        assert isinstance(info["version"], str) and info["context_length"] == 1024
        assert len(info["internal_states"]) == 1
        state = info["internal_states"][0]
        assert {"hit_rate", "tokens_in_cache", "free_slots", "total_slots"} <= set(state["cache"])
        assert {"weights_bytes", "kv_pool_tokens"} <= set(state["memory"])
        assert {"dtype", "attention_backend", "cuda_graph", "torch_compile"} <= set(state["execution"])
        assert state["execution"]["dtype"] == "float32"
        from plait.runtime.cpu import kernels

        if kernels.available():  # which CPU path runs, and how many steps took each product kernel
            execution = state["execution"]
            assert execution["cpu_kernels"] == "avx2" and execution["cpu_graph"] == "on"
            assert execution["attention_backend"] == "cpu" and "F32" in execution["weights"]  # a float folder
            assert set(execution["cpu_graph_steps"]) == {"decode_kernel", "panel_kernel"}
        assert state["debug"]["integrity"]["ok"], state["debug"]
    assert local["internal_states"][0].keys() == remote["internal_states"][0].keys()
    assert local["max_total_num_tokens"] == remote["max_total_num_tokens"] == 16384


# ---- where the Engine's model runs ----------------------------------------------------------------------------
def test_engine_builds_its_model_on_the_thread_that_runs_it():
    """The runner is made on the scheduler thread (one OpenMP pool in the process: with a second one,
    from loading on the caller's thread, libgomp sleeps at barriers on a small machine); a failure to
    build reaches the caller as itself, and the thread ends."""
    from plait.runtime.config import RuntimeConfig
    from plait.runtime.frontend.transport import InProcessTransport

    built_on = []

    def make_runner():
        built_on.append(threading.current_thread())
        raise FileNotFoundError("no model here")

    with pytest.raises(FileNotFoundError, match="no model here"):
        InProcessTransport(make_runner, RuntimeConfig.from_options(device="cpu"))
    assert [t.name for t in built_on] == ["plait-scheduler"]
    assert built_on[0] is not threading.current_thread() and not built_on[0].is_alive()


def test_engine_runs_its_model_on_the_thread_that_built_it(engine):
    assert engine.transport.alive and engine.transport.runner is engine.runner
    seen = []
    original = engine.runner.forward

    def forward(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    engine.runner.forward = forward
    try:
        engine.generate("hello", GREEDY)
    finally:
        del engine.runner.forward
    assert seen and set(seen) == {"plait-scheduler"}


def test_cpu_stack_profile_splits_the_steps_time_by_phase(engine):
    """`kernels.stack_profile(True)` times each phase of the CPU decoder stack's steps until read back;
    off, it counts nothing."""
    from plait.runtime.cpu import kernels

    if not kernels.available():
        pytest.skip("no CPU kernels on this machine")
    kernels.stack_profile(True)
    engine.generate("time me", GREEDY)
    steps, phases = kernels.stack_profile(False)
    assert steps >= GREEDY["max_new_tokens"]  # a prefill step and a step per further token
    assert set(phases) == {"norm", "qkv", "rope_store", "attention", "o", "gate_up", "silu_mul", "down"}
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) > 0
    engine.generate("not timed", GREEDY)
    assert kernels.stack_profile(False) == (0, dict.fromkeys(phases, 0.0))
