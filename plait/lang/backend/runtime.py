"""`Runtime`: start a Plait server process for frontend use, and stop it again.

`Runtime(model_path=None, **server_args)` runs `python -m plait.launch_server --model-path ...
--port ...` (no path: the default model), with every keyword turned into its flag
(`chunked_prefill_size=256` -> `--chunked-prefill-size 256`, `True` -> a bare flag), waits until
`/health_generate` answers, and shuts the server down on `shutdown()` or at interpreter exit.
The server's output goes to a temporary log file, removed when the server exits cleanly.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, AsyncIterator

from plait.lang.backend.runtime_endpoint import RuntimeEndpoint

DEFAULT_PORT = 30000


def server_flags(server_args: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in server_args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def find_free_port(host: str, start: int) -> int:
    for port in range(start, start + 10000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in [{start}, {start + 10000})")


class Runtime:
    # The server command, before its flags (tests substitute a stand-in server).
    launch_command: tuple[str, ...] = (sys.executable, "-m", "plait.launch_server")

    def __init__(self, model_path: str | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 api_key: str | None = None, launch_timeout: float = 900.0, **server_args: Any):
        self.host = host
        self.port = find_free_port(host, port or DEFAULT_PORT)
        self.server_args = {"model_path": model_path, "host": host, "port": self.port, "api_key": api_key,
                            **server_args}
        self.url = f"http://{host}:{self.port}"
        self.generate_url = self.url + "/generate"
        self.api_key = api_key
        cmd = [*self.launch_command, *server_flags(self.server_args)]
        self._log = tempfile.NamedTemporaryFile(prefix="plait-server-", suffix=".log", delete=False)
        # Its own session, so shutdown can stop the server and any workers it started.
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.process.pid
        atexit.register(self.shutdown)
        try:
            self._wait_healthy(launch_timeout)
            self.endpoint = RuntimeEndpoint(self.url, api_key=api_key)
        except BaseException:
            self.shutdown()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}:\n{self.log_tail()}")
            req = urllib.request.Request(self.url + "/health_generate")
            if self.api_key:
                req.add_header("Authorization", f"Bearer {self.api_key}")
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not become healthy within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 4000) -> str:
        try:
            with open(self._log.name, encoding="utf-8", errors="replace") as f:
                return f.read()[-num_chars:]
        except OSError:
            return ""

    def shutdown(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            try:
                # The server alone: its graceful shutdown stops its scheduler process. Signalling the
                # whole group would kill the scheduler under it, which the server reports as a crash.
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
            except ProcessLookupError:
                pass
        atexit.unregister(self.shutdown)
        log = getattr(self, "_log", None)
        if log is not None and process is not None and process.returncode == 0:
            # A clean exit leaves nothing to read; a failed server's log stays for the post-mortem.
            log.close()
            try:
                os.unlink(log.name)
            except FileNotFoundError:
                pass

    # ---- conveniences SGLang's Runtime offers ---------------------------------------------------
    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def flush_cache(self) -> Any:
        return self.endpoint.flush_cache()

    def get_server_info(self) -> Any:
        return self.endpoint.get_server_info()

    def start_profile(self) -> None:
        self.endpoint.start_profile()

    def stop_profile(self) -> None:
        self.endpoint.stop_profile()

    def get_tokenizer(self) -> Any:
        """The served model's Hugging Face tokenizer, read the way the server reads it (a GGUF
        file's tokenizer is in its metadata, which `AutoTokenizer` cannot take as a path)."""
        info = self.endpoint.model_info
        path = info.get("tokenizer_path") or info.get("model_path")
        if isinstance(path, str) and path.endswith(".gguf"):
            from plait.runtime.tokenizer import Tokenizer

            return Tokenizer.from_gguf(path).hf
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def generate(self, prompt: str | list[str], sampling_params: dict | None = None, return_logprob: bool = False,
                 logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
                 lora_path: str | None = None) -> str:
        """The server's JSON answer, as a string (as SGLang's Runtime returns it)."""
        body = {"text": prompt, "sampling_params": sampling_params or {}, "return_logprob": return_logprob,
                "logprob_start_len": logprob_start_len, "top_logprobs_num": top_logprobs_num, "lora_path": lora_path}
        body = {k: v for k, v in body.items() if v is not None}
        return json.dumps(self.endpoint._generate(body))

    async def async_generate(self, prompt: str, sampling_params: dict | None = None) -> AsyncIterator[str]:
        """Text pieces of one streamed generation."""
        body = {"text": prompt, "sampling_params": sampling_params or {}, "stream": True}
        loop = asyncio.get_running_loop()
        events = self.endpoint._generate_stream(body)
        done = object()
        received = ""
        while True:
            event = await loop.run_in_executor(None, next, events, done)
            if event is done:
                return
            text = event.get("text", "")
            delta = text[len(received):] if text.startswith(received) else text
            received += delta
            if delta:
                yield delta

    add_request = async_generate
