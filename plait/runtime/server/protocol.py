"""Request models (pydantic) of the OpenAI-compatible and native APIs, and the error type.

Models are strict (no "5" for 5, no 1 for true) and forbid unknown fields, so a typo is a 400
that names it instead of a silently ignored option. Fields that OpenAI defines but that change
nothing here (`user`, `store`, `metadata`, ...) are accepted; fields whose feature is missing
(`suffix`, images) are accepted by the model and refused with a clear message later.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from plait.runtime.frontend.inputs import StrictModel

MAX_N = 128  # samples per prompt (validate.Limits.max_n checks it for /generate)
MAX_LOGPROBS = 20  # top alternatives per position (OpenAI allows 20)


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


_Strict = StrictModel


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
    workflow_id: str | None = None
    agent: str | None = None


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


class WorkflowStep(_Strict):
    id: str
    agents: list[str] = []
    next: list[str] = []


class WorkflowBody(_Strict):
    """An agent workflow's step graph (`POST /workflow`): which agents run at each step, which steps follow."""

    workflow_id: str
    steps: list[WorkflowStep]
    current_step: str | None = None


class AbortRequestBody(_Strict):
    rid: str = ""
    abort_all: bool = False


class TokenizeRequest(_Strict):
    prompt: str | list[str] | None = None
    text: str | list[str] | None = None  # an alias of prompt
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(_Strict):
    tokens: list[int]
    skip_special_tokens: bool = False
    model: str | None = None
