"""SGLang's `/generate` input as one strict pydantic model, read the same way by the HTTP server
(from JSON) and by `Engine.generate` (from its keyword arguments), so both refuse the same input
with the same message.

Strict: no "5" for 5, no 1 for true; unknown fields are refused by name, so a typo is an error
instead of a silently ignored option. `normalize()` checks the per-item shapes of batch fields
and builds the `SamplingParams`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from plait.runtime.frontend.errors import InvalidRequestError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateReqInput(StrictModel):
    """One prompt or a batch (`text` or `input_ids` a list), with per-item or shared options."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: list[int] | list[list[int] | None] | None = None  # one list, or one per item
    return_text_in_logprobs: bool | None = False
    stream: bool | None = False
    # Agent workflows: the cache keeps and prefetches by the workflow's step graph (one per item, or shared).
    workflow_id: str | list[str] | None = None
    agent: str | list[str] | None = None
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

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def unsupported_field(self) -> str | None:
        for name in ("input_embeds", "image_data", "video_data", "audio_data", "lora_path", "session_params",
                     "return_hidden_states", "custom_logit_processor"):
            if getattr(self, name) not in (None, False, [], {}):
                return name
        return None


def parse_model(model: type[BaseModel], data: Any) -> Any:
    """`model.model_validate(data)`, or an InvalidRequestError naming the offending fields."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = describe_validation_error(e)
        raise InvalidRequestError(message, param=param) from None


def parse_generate_input(data: Any) -> GenerateReqInput:
    inp = parse_model(GenerateReqInput, data)
    unsupported = inp.unsupported_field()
    if unsupported:
        raise InvalidRequestError(f"{unsupported} is not supported by this server", param=unsupported)
    return inp


def describe_validation_error(e: ValidationError) -> tuple[str, str | None]:
    """A message naming (at most three of) the offending fields and what is wrong with them, and
    the first field's name."""
    by_field: dict[str, list[dict]] = {}
    for err in e.errors():
        by_field.setdefault(str(err["loc"][0]) if err["loc"] else "", []).append(err)
    parts = [_describe(name, errors) for name, errors in list(by_field.items())[:3]]
    more = f" (and {len(by_field) - 3} more fields)" if len(by_field) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, next(iter(by_field), None) or None


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
