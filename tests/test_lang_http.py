"""RuntimeEndpoint and Runtime against stand-in servers that speak the `/generate` protocol
(SGLang's JSON and server-sent events), until the real server lands: a stdlib HTTP server in front
of the tiny engine, and a canned server script that `Runtime` launches and stops."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

import plait as sgl
from plait.lang.backend.runtime import Runtime, find_free_port, server_flags
from plait.lang.backend.runtime_endpoint import RuntimeEndpoint
from plait.lang.interpreter import ProgramError
from tests.test_lang_engine import tiny_engine

API_KEY = "secret-key"


def make_handler(engine, *, incremental: bool, seen: list, tokenize: bool = True):
    """`seen` gets (path, body) of every POST; without `tokenize` the server lacks /tokenize (404),
    like older SGLang servers."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                self._send(401, {"error": "unauthorized"})
                return False
            return True

        def do_GET(self):
            if not self._authorized():
                return
            if self.path == "/get_model_info":
                self._send(200, {"model_path": "in-memory", "chat_template": engine.tokenizer.chat_template})
            elif self.path == "/get_server_info":
                self._send(200, engine.get_server_info())
            else:
                self._send(404, {"error": self.path})

        def do_POST(self):
            if not self._authorized():
                return
            if self.path == "/flush_cache":
                engine.flush_cache()
                self._send(200, {})
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            if self.path == "/tokenize" and tokenize:
                self._send(200, {"count": len(engine.tokenizer.encode(body["prompt"]))})
                return
            if self.path != "/generate":
                self._send(404, {"error": self.path})
                return
            kwargs = dict(body)
            stream = kwargs.pop("stream", False)
            kwargs["prompt"] = kwargs.pop("text", None)
            try:
                result = engine.generate(**kwargs, stream=stream)
                if not stream:
                    self._send(200, result)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                sent_text, sent_ids = "", 0
                for snapshot in result:
                    event = dict(snapshot)
                    if incremental:  # like --incremental-streaming-output: only the new piece
                        event["text"] = snapshot["text"][len(sent_text):]
                        event["output_ids"] = snapshot["output_ids"][sent_ids:]
                        sent_text, sent_ids = snapshot["text"], len(snapshot["output_ids"])
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
            except ValueError as e:
                self._send(400, {"error": {"message": str(e)}})

    return Handler


@pytest.fixture(scope="module", params=[False, True], ids=["cumulative", "incremental"])
def server(request, default_tokenizer):
    engine = tiny_engine(default_tokenizer)
    seen: list = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(engine, incremental=request.param, seen=seen))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", engine, seen
    httpd.shutdown()
    httpd.server_close()


@sgl.function
def qa(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=6, ignore_eos=True))
    s += sgl.user("Sure?")
    s += sgl.assistant(sgl.select("sure", choices=["Yes", "No"]))


def test_endpoint_runs_programs_like_the_engine(server):
    url, engine, seen = server
    endpoint = RuntimeEndpoint(url, api_key=API_KEY)
    assert endpoint.chat_template.default_system_prompt.startswith("You are a helpful AI assistant named SmolLM")
    remote = qa.run(question="Hi", backend=endpoint, temperature=0)
    local = qa.run(question="Hi", backend=engine, temperature=0)
    assert remote.text() == local.text()
    assert remote.get_meta_info("sure")["normalized_prompt_logprobs"] == pytest.approx(
        local.get_meta_info("sure")["normalized_prompt_logprobs"], abs=1e-5)
    gen_body = next(b for _, b in seen if b.get("sampling_params", {}).get("max_new_tokens") == 6)
    assert gen_body["sampling_params"]["temperature"] == 0 and "<|im_end|>" in gen_body["sampling_params"]["stop"]
    batch = next(b for _, b in seen if isinstance(b.get("text"), list))
    assert batch["return_logprob"] and batch["sampling_params"]["max_new_tokens"] == 0  # one scoring request
    assert endpoint.flush_cache() is True and endpoint.get_server_info()["model_path"] == "in-memory"


def test_select_costs_one_generate_request(server):
    """The prompt's length comes from /tokenize (no scheduler step), the choices are scored in one
    batched request; a server without /tokenize gets a prefill-only request instead, once learned."""
    url, engine, seen = server
    endpoint = RuntimeEndpoint(url, api_key=API_KEY)
    seen.clear()
    first = qa.run(question="Hi", backend=endpoint, temperature=0)
    first.sync()
    assert [path for path, _ in seen] == ["/generate", "/tokenize", "/generate"]  # gen, count, score

    bare: list = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(engine, incremental=False, seen=bare, tokenize=False))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        old = RuntimeEndpoint(f"http://127.0.0.1:{httpd.server_port}", api_key=API_KEY)
        for _ in range(2):
            bare.clear()
            again = qa.run(question="Hi", backend=old, temperature=0)
            assert again.text() == first.text()
        prefill = [b for _, b in bare if b["sampling_params"] == {"max_new_tokens": 0}]
        assert [path for path, _ in bare] == ["/generate", "/generate", "/generate"] and len(prefill) == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_endpoint_streaming_both_modes(server):
    url, engine, _ = server
    endpoint = RuntimeEndpoint(url, api_key=API_KEY)
    full = qa.run(question="Stream", backend=engine, temperature=0)["answer"]
    state = qa.run(question="Stream", backend=endpoint, temperature=0, stream=True)
    assert "".join(state.text_iter("answer")) == full
    params = sgl.lang.params.GenParams().replace(max_new_tokens=8, ignore_eos=True, temperature=0)
    fake_state = SimpleNamespace(text_="Count:", images_=[])
    deltas = [d for d, _ in endpoint.generate_stream(fake_state, params)]
    assert "".join(deltas) == engine.generate("Count:", {"max_new_tokens": 8, "ignore_eos": True,
                                                         "temperature": 0})["text"]
    assert len(deltas) > 1


def test_endpoint_errors(server):
    url, _, _ = server
    with pytest.raises(RuntimeError, match="401"):
        RuntimeEndpoint(url)  # no api key
    endpoint = RuntimeEndpoint(url, api_key=API_KEY)

    @sgl.function
    def bad(s):
        s += "x" + sgl.gen("y", temperature=-1.0)

    with pytest.raises(ProgramError, match="HTTP 400"):
        bad.run(backend=endpoint)["y"]


def test_endpoint_keeps_connections_alive():
    """Requests from many threads share a few kept-alive connections; a connection the server closed
    while idle is replaced without failing the request; a stream read to its end gives its connection
    back, one left early closes it."""
    opened: list = []
    served = {"count": 0}
    lock = threading.Lock()

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def setup(self):
            super().setup()
            opened.append(self.client_address)

        def _reply(self, body: bytes, content_type: str = "application/json") -> None:
            with lock:
                served["count"] += 1
                count = served["count"]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if count % 10 == 0:
                self.close_connection = True  # an idle timeout, as the client sees it: closed without notice

        def do_GET(self):
            self._reply(json.dumps({"model_path": "m"}).encode())

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("stream"):
                self._reply(b"".join(b'data: {"text": "%d"}\n\n' % i for i in range(3)) + b"data: [DONE]\n\n",
                            "text/event-stream")
            else:
                self._reply(json.dumps({"text": "ok", "meta_info": {"prompt_tokens": 1}}).encode())

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        endpoint = RuntimeEndpoint(f"http://127.0.0.1:{httpd.server_port}")

        results: list = []

        def work():
            for _ in range(10):
                results.append(endpoint._generate({"text": "x"})["text"])

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == ["ok"] * 40 and served["count"] == 41  # model info, then 40 requests, each once
        assert len(opened) <= 4 + 4  # one per thread at most, plus one per connection the server closed
        opened.clear()
        for _ in range(3):
            assert [e["text"] for e in endpoint._generate_stream({"text": "x", "stream": True})] == ["0", "1", "2"]
        assert len(opened) <= 1
        abandoned = endpoint._generate_stream({"text": "x", "stream": True})
        next(abandoned)
        abandoned.close()
        assert endpoint._generate({"text": "x"})["text"] == "ok"
    finally:
        httpd.shutdown()
        httpd.server_close()


FAKE_SERVER = textwrap.dedent('''
    import argparse, json
    from http.server import BaseHTTPRequestHandler, HTTPServer
    p = argparse.ArgumentParser()
    p.add_argument("--host"); p.add_argument("--port", type=int); p.add_argument("--model-path")
    p.add_argument("--fail", action="store_true"); p.add_argument("--chunked-prefill-size", type=int)
    args = p.parse_args()
    if args.fail:
        raise SystemExit("cannot load the model")
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def reply(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            self.reply({"model_path": args.model_path, "chunk": args.chunked_prefill_size})
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply({"text": " canned", "output_ids": [1], "meta_info": {"prompt_tokens": 3}})
    HTTPServer((args.host, args.port), H).serve_forever()
''')


def test_runtime_launches_waits_and_shuts_down(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)

    class FakeRuntime(Runtime):
        launch_command = (sys.executable, str(script))

    runtime = FakeRuntime(model_path="some/model", chunked_prefill_size=256, port=find_free_port("127.0.0.1", 31000))
    try:
        assert runtime.endpoint.model_info == {"model_path": "some/model", "chunk": 256}
        assert runtime.endpoint.chat_template.name == "default"

        @sgl.function
        def prog(s):
            s += "Say" + sgl.gen("x")

        assert prog.run(backend=runtime)["x"] == " canned"  # a Runtime is accepted as a backend
        sgl.set_default_backend(runtime)
        try:
            assert sgl.global_config.default_backend.endpoint.get_model_name() == "some/model"
            assert prog.run()["x"] == " canned"
        finally:
            sgl.global_config.default_backend = None
        assert json.loads(runtime.generate("hi"))["text"] == " canned"
    finally:
        runtime.shutdown()
    assert runtime.process.poll() is not None
    with pytest.raises(RuntimeError, match="cannot load the model"):
        FakeRuntime(fail=True, launch_timeout=30)


def test_server_flags_and_ports():
    assert server_flags({"model_path": "m", "tp_size": 2, "disable_radix_cache": True, "enable_metrics": False,
                         "api_key": None, "stop": ["a", "b"]}) == [
        "--model-path", "m", "--tp-size", "2", "--disable-radix-cache", "--stop", "a", "b"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        taken = sock.getsockname()[1]
        assert find_free_port("127.0.0.1", taken) != taken
