"""Online serving benchmark against a running server (SGLang's bench_serving).

    python -m plait.bench.serving --backend sglang --base-url http://127.0.0.1:30000 \\
        --dataset-name random --num-prompts 64 --random-input-len 256 --random-output-len 32 \\
        --request-rate 8 --max-concurrency 16 --output-file results.jsonl

Backends: `sglang` (native `/generate`, Plait or SGLang), `openai` (`/v1/completions`: Plait,
SGLang, vLLM, llama-server) and `openai-chat` (`/v1/chat/completions`, text prompts). Datasets:
`random` and `generated-shared-prefix` (plait.bench.datasets, token-exact prompts), and
`sharegpt` (a ShareGPT-format JSON file given by --dataset-path). Requests arrive as a Poisson
process at --request-rate per second (default inf: all at once), at most --max-concurrency in
flight. Every request streams, so the client sees its time to first token (TTFT), the gaps
between chunks (ITL), time per output token after the first (TPOT) and end-to-end latency.

Prints request and token throughput and mean/median/p99 of each latency; appends one JSON
line to --output-file. The client is asyncio over plain HTTP/1.1 (no dependencies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from plait.bench.datasets import (
    BenchRequest,
    add_dataset_args,
    dataset_from_args,
    dataset_params,
    summarize,
    text_token_ids,
)

BACKENDS = ("sglang", "openai", "openai-chat")


# ---- a minimal asyncio HTTP/1.1 client --------------------------------------------------------------
class HttpError(Exception):
    pass


async def http_request(url: str, body: Any | None = None, *, headers: dict[str, str] | None = None,
                       method: str | None = None, timeout: float | None = None) -> AsyncIterator[bytes]:
    """Send a request and yield the response body as it arrives (chunked or not).
    Raises HttpError(status, first bytes of the body) for a non-2xx status."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url}")
    payload = b"" if body is None else json.dumps(body).encode()
    method = method or ("GET" if body is None else "POST")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", "Accept: */*"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        response_headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            response_headers[name.strip().lower()] = value.strip()
        chunks = _read_body(reader, response_headers)
        if not 200 <= status < 300:
            data = b"".join([c async for c in chunks])
            raise HttpError(f"HTTP {status}: {data[:500].decode(errors='replace')}")
        async for chunk in chunks:
            yield chunk
    finally:
        writer.close()


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while chunk := await reader.read(65536):
            yield chunk


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent event stream (without the `[DONE]` marker)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while True:
            cut = buffer.find(b"\n\n")
            if cut < 0:
                break
            event, buffer = buffer[:cut], buffer[cut + 2 :]
            for line in event.replace(b"\r", b"").split(b"\n"):
                if line.startswith(b"data:"):
                    data = line[5:].strip().decode()
                    if data != "[DONE]":
                        yield data


async def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    return json.loads(b"".join([c async for c in http_request(url, headers=headers, timeout=30)]))


# ---- one request ------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0  # as reported by the server (usage / meta_info), else counted by the client
    expected_output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between chunks that carried text
    cached_tokens: int | None = None
    text: str = ""


@dataclass
class Client:
    backend: str
    base_url: str
    model: str | None
    prompt_format: str  # ids | text
    ignore_eos: bool
    extra_body: dict[str, Any]
    api_key: str | None
    tokenizer: Any

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def build(self, req: BenchRequest) -> tuple[str, dict[str, Any]]:
        prompt: Any = req.prompt_ids
        if self.prompt_format == "text" or self.backend == "openai-chat":
            prompt = self.tokenizer.decode(req.prompt_ids, skip_special_tokens=False)
        if self.backend == "sglang":
            params = {"max_new_tokens": req.output_len, "temperature": 0.0}
            if self.ignore_eos:
                params["ignore_eos"] = True
            key = "text" if isinstance(prompt, str) else "input_ids"
            return "/generate", {key: prompt, "sampling_params": params, "stream": True, **self.extra_body}
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body.update(ignore_eos=True, min_tokens=req.output_len)
        body.update(self.extra_body)
        if self.backend == "openai-chat":
            return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **body}
        return "/v1/completions", {"prompt": prompt, **body}

    async def send(self, req: BenchRequest) -> RequestResult:
        path, body = self.build(req)
        result = RequestResult(prompt_len=len(req.prompt_ids), expected_output_len=req.output_len)
        start = last = time.perf_counter()
        text_parts: list[str] = []
        reported: int | None = None
        try:
            async for data in sse_events(http_request(self.base_url + path, body, headers=self.headers)):
                event = json.loads(data)
                if "error" in event and not event.get("choices"):
                    raise HttpError(str(event["error"]))
                piece, count, cached = self._parse(event, "".join(text_parts))
                reported = count if count is not None else reported
                result.cached_tokens = cached if cached is not None else result.cached_tokens
                if piece:
                    now = time.perf_counter()
                    if not text_parts:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    text_parts.append(piece)
            result.latency = time.perf_counter() - start
            result.text = "".join(text_parts)
            result.output_len = reported if reported is not None else self._count(result.text)
            result.success = True
        except (HttpError, OSError, ValueError, asyncio.IncompleteReadError) as e:
            result.error = f"{type(e).__name__}: {e}"
        return result

    def _parse(self, event: dict[str, Any], sofar: str) -> tuple[str, int | None, int | None]:
        """(new text, completion tokens so far if reported, cached prompt tokens if reported)."""
        if self.backend == "sglang":
            meta = event.get("meta_info") or {}
            text = event.get("text", "")
            return text[len(sofar):], meta.get("completion_tokens"), meta.get("cached_tokens")
        usage = event.get("usage") or {}
        count = usage.get("completion_tokens")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        pieces = []
        for choice in event.get("choices") or []:
            if self.backend == "openai-chat":
                pieces.append((choice.get("delta") or {}).get("content") or "")
            else:
                pieces.append(choice.get("text") or "")
        return "".join(pieces), count, cached

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if self.tokenizer is not None else 0


# ---- the run ----------------------------------------------------------------------------------------
async def run_benchmark(client: Client, requests: Sequence[BenchRequest], *, request_rate: float,
                        max_concurrency: int | None, seed: int = 0) -> tuple[list[RequestResult], float]:
    """Send every request (Poisson arrivals at `request_rate`/s, or all at once for inf); returns
    the results in dataset order and the wall-clock duration."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(req: BenchRequest) -> RequestResult:
        if limit is None:
            return await client.send(req)
        async with limit:
            return await client.send(req)

    start = time.perf_counter()
    tasks = []
    for req in requests:
        tasks.append(asyncio.create_task(one(req)))
        if request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def _stats(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    rank = (len(ordered) - 1) * 0.99  # linear interpolation between closest ranks, as numpy.percentile
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    p99 = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return {"mean": statistics.fmean(values) * scale, "median": statistics.median(values) * scale, "p99": p99 * scale}


def summarize_results(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "num_wrong_output_len": sum(r.output_len != r.expected_output_len for r in ok),
        "request_throughput": len(ok) / duration, "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration, "total_throughput": (input_tokens + output_tokens) / duration,
        "concurrency": sum(r.latency for r in ok) / duration,
        "cache_hit_rate": sum(cached) / input_tokens if cached and len(cached) == len(ok) and input_tokens else None,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpots),
        "itl_ms": _stats([g for r in ok for g in r.itl]), "e2e_latency_ms": _stats([r.latency for r in ok]),
    }


def print_summary(record: dict[str, Any]) -> None:
    print("\n{s:=^60}".format(s=" Serving Benchmark Result "))
    rows = [
        ("Backend", record["backend"]), ("Request rate (req/s)", record["request_rate"]),
        ("Max concurrency", record["max_concurrency"]), ("Successful requests", record["completed"]),
        ("Failed requests", record["failed"]), ("Benchmark duration (s)", f"{record['duration_s']:.2f}"),
        ("Total input tokens", record["total_input_tokens"]), ("Total generated tokens", record["total_output_tokens"]),
        ("Request throughput (req/s)", f"{record['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{record['input_throughput']:.1f}"),
        ("Output token throughput (tok/s)", f"{record['output_throughput']:.1f}"),
        ("Total token throughput (tok/s)", f"{record['total_throughput']:.1f}"),
        ("Concurrency", f"{record['concurrency']:.2f}"),
    ]
    if record["cache_hit_rate"] is not None:
        rows.append(("Cache hit rate", f"{record['cache_hit_rate']:.3f}"))
    for name, value in rows:
        print(f"{name + ':':<42} {value}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_latency_ms", "End-to-End Latency")):
        print("{s:-^60}".format(s=title))
        for stat in ("mean", "median", "p99"):
            print(f"{stat.capitalize() + ' (ms):':<42} {record[key][stat]:.2f}")
    if record["failed"]:
        print("Errors:", *record["errors"], sep="\n  ")
    print("=" * 60, flush=True)


# ---- datasets from files --------------------------------------------------------------------------
def sharegpt_dataset(path: str, tokenizer: Any, *, num_prompts: int, output_len: int | None = None,
                     context_len: int = 2048, seed: int = 0) -> list[BenchRequest]:
    """First human turn as the prompt, the length of the first reply as the output length; skips
    very short pairs and those longer than `context_len` (SGLang's filter)."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    pairs = []
    for rec in records:
        turns = rec.get("conversations") or rec.get("conversation") or []
        if len(turns) >= 2:
            pairs.append((turns[0].get("value", ""), turns[1].get("value", "")))
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        prompt_ids = tokenizer.encode(prompt)
        out_len = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if len(prompt_ids) < 4 or out_len < 4 or len(prompt_ids) + out_len > context_len:
            continue
        requests.append(BenchRequest(prompt_ids, out_len))
        if len(requests) == num_prompts:
            break
    if not requests:
        raise ValueError(f"{path}: no usable conversations")
    return requests


# ---- the program ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="sglang")
    parser.add_argument("--base-url", default=None, help="default: http://HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--model", default=None, help="model name for the OpenAI API (default: the first listed)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or .gguf (default: the server's model if local, else the default "
                             "model's)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                        help="send token ids (exact lengths) or their decoded text; openai-chat always sends text")
    parser.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    parser.add_argument("--extra-request-body", default="{}", help="JSON merged into every request")
    parser.add_argument("--warmup-requests", type=int, default=1)
    parser.add_argument("--dataset-path", default=None, help="sharegpt: the JSON file")
    parser.add_argument("--sharegpt-output-len", type=int, default=None)
    parser.add_argument("--sharegpt-context-len", type=int, default=2048)
    parser.add_argument("--output-file", default=None, help="append the result as one JSON line")
    parser.add_argument("--run-name", default="")
    add_dataset_args(parser)
    for action in parser._actions:  # datasets.py's generators plus ShareGPT files, read here
        if action.dest == "dataset_name":
            action.choices = (*action.choices, "sharegpt")
    return parser


def load_tokenizer(path: str | None, server_model_path: str | None) -> Any:
    from plait.runtime.model_loader import resolve_model
    from plait.runtime.tokenizer import Tokenizer

    for candidate in (path, server_model_path):
        if candidate and os.path.exists(candidate):
            if os.path.isdir(candidate):
                return Tokenizer.from_folder(candidate)
            if candidate.endswith(".gguf"):
                return Tokenizer.from_gguf(candidate)
        elif candidate == path and path:
            raise ValueError(f"--tokenizer {path}: no such file or folder")
    return resolve_model(None).tokenizer


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model, server_model_path = args.model, None
    try:
        info = await get_json(base_url + "/get_model_info", headers)
        server_model_path = info.get("tokenizer_path") or info.get("model_path")
    except (HttpError, OSError, ValueError):
        pass  # not an SGLang-style server
    if model is None and args.backend != "sglang":
        model = (await get_json(base_url + "/v1/models", headers))["data"][0]["id"]
    tokenizer = load_tokenizer(args.tokenizer, server_model_path)
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("--dataset-name sharegpt needs --dataset-path")
        requests = sharegpt_dataset(args.dataset_path, tokenizer, num_prompts=args.num_prompts,
                                    output_len=args.sharegpt_output_len, context_len=args.sharegpt_context_len,
                                    seed=args.seed)
    else:
        requests = dataset_from_args(args, text_token_ids(tokenizer, len(tokenizer.hf)))
    client = Client(args.backend, base_url, model, args.prompt_format, not args.disable_ignore_eos,
                    json.loads(args.extra_request_body), args.api_key, tokenizer)
    summary = summarize(requests)
    print(f"{args.backend} at {base_url}, dataset {args.dataset_name}: {summary.num_requests} requests, "
          f"{summary.input_tokens} input tokens, {summary.output_tokens} output tokens", flush=True)
    if args.warmup_requests:
        warm = await asyncio.gather(*(client.send(BenchRequest(requests[0].prompt_ids[:16], 4))
                                      for _ in range(args.warmup_requests)))
        if not all(r.success for r in warm):
            raise SystemExit(f"warm-up failed: {warm[0].error}")
    results, duration = await run_benchmark(client, requests, request_rate=args.request_rate,
                                            max_concurrency=args.max_concurrency, seed=args.seed)
    params = dataset_params(args) if args.dataset_name != "sharegpt" else {
        "dataset_name": "sharegpt", "dataset_path": args.dataset_path, "num_prompts": args.num_prompts}
    return {"bench": "serving", "backend": args.backend, "base_url": base_url, "model": model,
            "run_name": args.run_name, "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
            **params, "ideal_hit_rate": summary.ideal_hit_rate, **summarize_results(results, duration)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    record = asyncio.run(_main(args))
    print_summary(record)
    if args.output_file:
        from plait.bench.one_batch import environment

        with open(args.output_file, "a") as f:
            f.write(json.dumps({**record, "env": environment()}) + "\n")
    return record


if __name__ == "__main__":
    main()
