"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Requests are converted into `/generate` input (sampling fields into `SamplingParams` names) and run
through the same front end as `/generate`; parsing, the chat template and tokenization run off
the event loop. Responses are built by one `_Choice` per generated sequence that hands out what
is new since its last call; the non-streaming response is the same call made once at the end,
so streamed and non-streamed text and logprobs cannot differ.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.responses import Response

from plait.runtime.frontend.errors import SchedulerUnavailable
from plait.runtime.frontend.tracker import RequestGroup, RequestState
from plait.runtime.server.app import (
    JSON,
    SSE_DONE,
    EventStream,
    ServerState,
    body_schema,
    check_errors,
    parse,
    read_json,
    request_error,
    sse,
)
from plait.runtime.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from plait.runtime.server.tool_parser import ToolCallStream, merge_tool_deltas
from plait.runtime.server.tools import ToolPlan, plan_tools

_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def register(app: FastAPI, state: ServerState) -> list[type[BaseModel]]:
    """Add the routes; returns the request-body models they read (for /openapi.json)."""

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSON({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        state.check_model(model_id)
        return JSON(_model_card(state))

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        data = await read_json(request, state)
        req, states, choices, rid = await state.run_cpu(_prepare_completion, state, data)
        return await _respond(state, request, req, states, choices, "text_completion", "cmpl-" + rid)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        data = await read_json(request, state)
        req, states, choices, rid = await state.run_cpu(_prepare_chat, state, data)
        return await _respond(state, request, req, states, choices, "chat.completion", "chatcmpl-" + rid)

    return [CompletionRequest, ChatCompletionRequest]


def _prepare_completion(state: ServerState, data: dict[str, Any]) -> tuple[Any, list[RequestState], list, str]:
    req = parse(CompletionRequest, data)
    _check_common(state, req)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, "best_of is not supported (only best_of equal to n)", param="best_of")
    text, ids = _completion_prompt(req.prompt)
    want_logprobs = req.logprobs is not None
    rid = req.rid or uuid.uuid4().hex
    inp = {
        "text": text, "input_ids": ids, "rid": rid, "stream": req.stream,
        "workflow_id": req.workflow_id, "agent": req.agent,
        "sampling_params": _sampling(req, 16 if req.max_tokens is None else req.max_tokens),
        "return_logprob": want_logprobs, "top_logprobs_num": req.logprobs or 0,
        "logprob_start_len": 0 if req.echo and want_logprobs else -1,
    }
    states, _ = state.prepare({k: v for k, v in inp.items() if v is not None})
    tokens = _TokenStrings(state.ready.tokenizer)
    prompts = text if isinstance(text, list) else [text] if text is not None else None

    def echo(i: int) -> str | None:
        if not req.echo:
            return None
        if prompts is not None:
            return prompts[i // req.n]
        return tokens.decode(states[i].request.input_ids)

    choices = [_Choice(i, s, tokens, chat=False, echo=echo(i)) for i, s in enumerate(states)]
    return req, states, choices, rid


def _prepare_chat(state: ServerState, data: dict[str, Any]) -> tuple[Any, list[RequestState], list, str]:
    req = parse(ChatCompletionRequest, data)
    _check_common(state, req)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tools, ids = _chat_prompt(state, req)
    max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_new is None:  # OpenAI's default: until the context is full
        max_new = max(1, state.ready.limits.context_length - len(ids))
    params = _sampling(req, max_new)
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if req.json_schema or req.regex or req.ebnf:
            raise ApiError(400, "give either response_format or one of json_schema/regex/ebnf",
                           param="response_format")
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None
        params["json_schema"] = schema if schema is not None else {"type": "object"}
    if tools.json_schema is not None:
        given = next((k for k in ("json_schema", "regex", "ebnf") if k in params), None)
        if given is not None:
            given = "response_format" if fmt is not None and fmt.type != "text" else given
            raise ApiError(400, f"tool_choice {req.tool_choice!r} constrains the output to tool calls; it cannot"
                                f" be combined with {given}", param="tool_choice")
        params["json_schema"] = tools.json_schema
    rid = req.rid or uuid.uuid4().hex
    workflow = {k: v for k, v in (("workflow_id", req.workflow_id), ("agent", req.agent)) if v is not None}
    states, _ = state.prepare({"input_ids": ids, "sampling_params": params, "rid": rid,
                               "return_logprob": req.logprobs, "top_logprobs_num": req.top_logprobs or 0,
                               "stream": req.stream, **workflow})
    tokens = _TokenStrings(state.ready.tokenizer)
    choices = [_Choice(i, s, tokens, chat=True,
                       tools=ToolCallStream(tools.parser, max_calls=tools.max_calls) if tools.parser else None)
               for i, s in enumerate(states)]
    return req, states, choices, rid


def _model_card(state: ServerState) -> dict[str, Any]:
    context = state.front.ready.limits.context_length if state.front.ready else None
    return {"id": state.model_name, "object": "model", "created": int(state.started_at), "owned_by": "plait",
            "root": state.model_name, "max_model_len": context}


def _check_common(state: ServerState, req: Any) -> None:
    state.check_model(req.model)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")


def _sampling(req: Any, max_new_tokens: int) -> dict[str, Any]:
    """OpenAI's names for SamplingParams fields; absent ones keep SamplingParams' (or the model's) defaults."""
    values = {
        "max_new_tokens": max_new_tokens, "min_new_tokens": req.min_tokens, "n": req.n,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "stop": req.stop, "stop_token_ids": req.stop_token_ids, "seed": req.seed,
        "frequency_penalty": req.frequency_penalty, "presence_penalty": req.presence_penalty,
        "repetition_penalty": req.repetition_penalty, "logit_bias": req.logit_bias, "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens, "no_stop_trim": req.no_stop_trim,
        "spaces_between_special_tokens": req.spaces_between_special_tokens,
        "regex": req.regex, "json_schema": req.json_schema, "ebnf": req.ebnf,
    }
    return {k: v for k, v in values.items() if v is not None}


def _completion_prompt(prompt: Any) -> tuple[Any, Any]:
    """(text, input_ids) for GenerateInput from the four shapes of `prompt`."""
    if isinstance(prompt, str):
        return prompt, None
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], str):
        return prompt, None
    return None, prompt  # token ids, or a list of token-id lists


def _chat_prompt(state: ServerState, req: ChatCompletionRequest) -> tuple[ToolPlan, list[int]]:
    tokenizer = state.tokenizer
    messages = []
    for i, m in enumerate(req.messages):
        message = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported, got a"
                                        f" {part.type!r} part", param="messages")
                texts.append(part.text)
            message["content"] = "\n".join(texts)
        elif m.content is None:
            message["content"] = ""
        if message["role"] == "developer":  # OpenAI's newer name for system; templates know "system"
            message["role"] = "system"
        messages.append(message)
    template = tokenizer.chat_template
    if template is None:
        raise ApiError(400, "this model has no chat template: start the server with --chat-template,"
                            " or use /v1/completions")
    tools = plan_tools(req, messages, chat_template=template, parser_name=state.config.tool_call_parser,
                       grammar_backend=state.runtime_options.get("grammar_backend"))
    try:
        prompt = tokenizer.apply_chat_template(
            tools.messages, tools=tools.template_tools, add_generation_prompt=not req.continue_final_message,
            continue_final_message=req.continue_final_message, **(req.chat_template_kwargs or {}))
    except Exception as e:  # jinja's TemplateError (raise_exception in templates), bad kwargs
        raise ApiError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
    return tools, tokenizer.encode(prompt, add_special_tokens=False)


# ---- responses ---------------------------------------------------------------------------------------
async def _respond(state: ServerState, request: Request, req: Any, states: list[RequestState],
                   choices: list["_Choice"], kind: str, response_id: str) -> Response:
    group = state.submit(states)
    header = {"id": response_id, "object": kind, "created": int(time.time()), "model": state.model_name}
    if req.stream:
        await state.start_stream(request, group)
        return EventStream(_stream(state, req, group, choices, header), state, group)
    await state.wait(request, group)
    check_errors(states)
    body = [c.full() for c in choices]
    return JSON({**header, "choices": body, "usage": _usage(states, req.n)})


async def _stream(state: ServerState, req: Any, group: RequestGroup, choices: list["_Choice"],
                  header: dict[str, Any]) -> AsyncIterator[bytes]:
    kind = header["object"]
    chunk_header = {**header, "object": f"{kind}.chunk" if kind == "chat.completion" else kind}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

    def chunk(choice_list: list[dict[str, Any]]) -> bytes:
        usage = _usage(group.states, req.n) if continuous else None
        return sse({**chunk_header, "choices": choice_list, "usage": usage})

    try:
        async for changed in group.updates():
            for i in changed:
                for piece in choices[i].deltas():
                    yield chunk([piece])
                error = request_error(group.states[i]) if group.states[i].finished else None
                if error is not None:
                    yield sse(error.body())
        if include_usage:
            yield sse({**chunk_header, "choices": [], "usage": _usage(group.states, req.n)})
        yield SSE_DONE
    except SchedulerUnavailable as e:
        yield sse(ApiError(500, f"the request failed: {e}").body())
        yield SSE_DONE
    finally:
        state.finish(group)


def _usage(states: list[RequestState], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (its n samples share it); completion tokens per sample."""
    prompt = cached = 0
    for first in range(0, len(states), n):
        copies = states[first : first + n]
        prompt += len(copies[0].request.input_ids)
        cached += max(s.meta.get("cached_tokens", 0) for s in copies)
    completion = sum(s.meta.get("completion_tokens", len(s.output_ids)) for s in states)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _Choice:
    """One generated sequence; hands out what is new since the previous call."""

    def __init__(self, index: int, state: RequestState, tokens: "_TokenStrings", *, chat: bool,
                 echo: str | None = None, tools: ToolCallStream | None = None):
        self.index = index
        self.state = state
        self.tokens = tokens
        self.chat = chat
        self.echo = echo
        self.tools = tools  # reads tool calls out of the text (chat with tools)
        self.sent_text = 0
        self.sent_logprobs = 0
        self.started = False  # chat: the role delta; completions: the echoed prompt
        self.done = False
        self.text_offset = 0

    def full(self) -> dict[str, Any]:
        pieces = self.deltas()
        text = "".join(p["delta"].get("content") or "" if self.chat else p["text"] for p in pieces)
        last = pieces[-1] if pieces else {}
        logprobs = self._merge_logprobs([p.get("logprobs") for p in pieces])
        out: dict[str, Any] = {"index": self.index}
        if self.chat:
            calls = merge_tool_deltas([c for p in pieces for c in p["delta"].get("tool_calls", ())])
            out["message"] = {"role": "assistant", "content": text if text or not calls else None,
                              "reasoning_content": None, "tool_calls": calls or None}
        else:
            out["text"] = text
        out.update(logprobs=logprobs, finish_reason=last.get("finish_reason"), matched_stop=last.get("matched_stop"))
        return out

    def deltas(self) -> list[dict[str, Any]]:
        """Stream chunks' choice objects for what arrived since the last call (possibly none)."""
        s = self.state
        if self.done:
            return []
        pieces: list[dict[str, Any]] = []
        prefix = ""
        prompt_entries: list[tuple[Any, int, Any]] = []
        if not self.started:
            self.started = True
            if self.chat:
                pieces.append(self._piece({"role": "assistant", "content": ""}, None))
            elif self.echo is not None:
                prefix = self.echo
                if s.request.return_logprob:
                    lp = s.logprobs
                    prompt_entries = [(v, t, _at(lp["input_top_logprobs"], j))
                                      for j, (v, t) in enumerate(lp["input_token_logprobs"])]
        if self.tools is not None:
            text, calls = self.tools.update(s.text, final=s.finished)
        else:
            text, calls = prefix + s.text[self.sent_text:], []
        self.sent_text = len(s.text)
        entries = prompt_entries
        if s.request.return_logprob:
            lp = s.logprobs
            new = lp["output_token_logprobs"][self.sent_logprobs:]
            tops = lp["output_top_logprobs"]
            entries = entries + [(v, t, _at(tops, self.sent_logprobs + j)) for j, (v, t) in enumerate(new)]
            self.sent_logprobs += len(new)
        reason = matched = None
        if s.finished:
            self.done = True
            fr = s.meta.get("finish_reason") or {}
            reason = _FINISH_REASONS.get(fr.get("type"), fr.get("type"))
            matched = fr.get("matched") if fr.get("type") == "stop" else None
            if reason == "stop" and self.tools is not None and self.tools.num_calls:
                reason = "tool_calls"
        logprobs = self._logprobs(entries) if s.request.return_logprob else None
        if self.chat:
            if text or (entries and not calls):
                pieces.append(self._piece({"content": text} if text or self.tools is None else {}, logprobs))
                logprobs = None
            for call in calls:  # one chunk per call, as OpenAI streams them
                pieces.append(self._piece({"tool_calls": [call]}, logprobs))
                logprobs = None
            if reason is not None:
                pieces.append(self._piece({}, None, reason, matched))
        elif text or entries or reason is not None:
            pieces.append({"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": reason,
                           "matched_stop": matched})
        return pieces

    def _piece(self, delta: dict[str, Any], logprobs: Any, reason: str | None = None, matched: Any = None) -> dict:
        return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
                "matched_stop": matched}

    def _logprobs(self, entries: list[tuple[float | None, int, Any]]) -> dict[str, Any]:
        if self.chat:
            content = []
            for value, token_id, top in entries:
                text, raw = self.tokens.get(token_id)
                alternatives = [{"token": self.tokens.get(t)[0], "logprob": v, "bytes": self.tokens.get(t)[1]}
                                for v, t in (top or [])]
                content.append({"token": text, "logprob": value, "bytes": raw, "top_logprobs": alternatives})
            return {"content": content}
        tokens, values, tops, offsets = [], [], [], []
        for value, token_id, top in entries:
            text = self.tokens.get(token_id)[0]
            tokens.append(text)
            values.append(value)
            tops.append(None if top is None else {self.tokens.get(t)[0]: v for v, t in top})
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _merge_logprobs(self, parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        parts = [p for p in parts if p is not None]
        if not self.state.request.return_logprob:
            return None
        if self.chat:
            return {"content": [e for p in parts for e in p["content"]]}
        keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        return {key: [e for p in parts for e in p[key]] for key in keys}


def _at(items: list, i: int) -> Any:
    return items[i] if i < len(items) else None


class _TokenStrings:
    """Token id -> (OpenAI's token string, its UTF-8 bytes). A token that is not whole UTF-8 on its
    own (part of a multi-byte character) is written `bytes:\\xe2\\x80`, as OpenAI does."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}
        hf = tokenizer.backend if tokenizer is not None else None
        decoder = getattr(getattr(hf, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.special = set(getattr(hf, "all_special_ids", None) or [])
        self.special |= set(getattr(hf, "added_tokens_decoder", None) or {})

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self.cache[token_id] = (text, list(raw))
        return hit

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else ""

    def _bytes(self, token_id: int) -> bytes:
        if self.tokenizer is None:
            return str(token_id).encode()
        hf = self.tokenizer.backend
        piece = hf.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self.special:
            return piece.encode("utf-8")
        if self.byte_level and all(ch in _BYTE_OF_CHAR for ch in piece):
            return bytes(_BYTE_OF_CHAR[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: printable Latin-1 bytes stand
    for themselves, the others (controls, space, ...) are shifted to U+0100 onwards, in order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(0x100 + shifted)] = b
            shifted += 1
    return table


_BYTE_OF_CHAR = _byte_level_table()
