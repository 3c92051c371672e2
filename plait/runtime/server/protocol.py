"""Request models (pydantic) of the OpenAI-compatible and native APIs, and the error type.

Models are strict (no "5" for 5, no 1 for true) and forbid unknown fields, so a typo is a 400
that names it instead of a silently ignored option. Fields that OpenAI defines but that change
nothing here (`user`, `store`, `metadata`, ...) are accepted; fields whose feature is missing
(`suffix`, images) are accepted by the model and refused with a clear message later.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 128  # samples per prompt
MAX_LOGPROBS = 20  # top alternatives per position (OpenAI allows 20)
MAX_BATCH = 1024  # sequences per HTTP request, after n-expansion


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code if code is not None else status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable"}


def validation_error(e: ValidationError) -> ApiError:
    """A 400 naming the offending fields and what is wrong with them."""
    by_field: dict[str, list[dict]] = {}
    for err in e.errors():
        by_field.setdefault(str(err["loc"][0]) if err["loc"] else "", []).append(err)
    parts = []
    for name, errors in list(by_field.items())[:3]:
        parts.append(_describe(name, errors))
    more = f" (and {len(by_field) - 3} more fields)" if len(by_field) > 3 else ""
    return ApiError(400, "invalid request: " + "; ".join(parts) + more, param=next(iter(by_field), None) or None)


def _describe(name: str, errors: list[dict]) -> str:
    first = errors[0]
    if first["type"] == "extra_forbidden":
        return f"{name}: unknown field"
    if first["type"] == "missing" and len(first["loc"]) == 1:
        return f"{name}: field required"
    if len(errors) > 1 and all(len(err["loc"]) > 1 for err in errors):
        # A union: pydantic tried each member type; say which types were expected.
        tags = list(dict.fromkeys(str(err["loc"][1]) for err in errors))
        if all(not t.isdigit() for t in tags):
            return f"{name}: must be of type {' or '.join(tags)}"
    loc = ".".join(str(x) for x in first["loc"])
    return f"{loc}: {first['msg']}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage on every chunk (a vLLM/SGLang extension)


class _SamplingFields(_Strict):
    """What the two OpenAI endpoints share: OpenAI's sampling fields plus SGLang's extras."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # SGLang's extras (sent by the openai client through extra_body)
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = Field(None, ge=0)
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ebnf: str | None = None
    rid: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError(f"at most 16 stop sequences, got {len(v)}")
        return v


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends a JSON string; some clients send the object


class MessageToolCall(BaseModel):
    """A call in an earlier assistant message of the conversation."""

    model_config = ConfigDict(extra="allow", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # refusal, audio, ...
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this is the result of


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; none: no arguments
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None  # checked in tools.py, with messages that say what is wrong
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None


class GenerateRequestBody(_Strict):
    """SGLang's `/generate` body. The fields `GenerateInput` has are passed on as they are;
    `normalize()` checks their per-item shapes and the sampling parameters."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: list[int] | list[list[int]] | None = None
    return_text_in_logprobs: bool | None = False
    stream: bool | None = False
    # Accepted, no effect here.
    log_metrics: bool | None = None
    priority: int | None = None
    modalities: list[str] | None = None
    custom_labels: dict[str, Any] | None = None
    no_logs: bool | None = None
    # Features this server does not have: refused when given.
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    lora_path: Any = None
    session_params: Any = None
    return_hidden_states: Any = None
    custom_logit_processor: Any = None

    def unsupported_field(self) -> str | None:
        for name in ("input_embeds", "image_data", "video_data", "audio_data", "lora_path", "session_params",
                     "return_hidden_states", "custom_logit_processor"):
            if getattr(self, name) not in (None, False, [], {}):
                return name
        return None
