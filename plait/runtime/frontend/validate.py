"""`validate(request, limits)`: everything the scheduler would refuse or choke on, checked in one place.

The front end calls it for every request before sending it (the `Engine` and the HTTP server
alike), so a bad request fails at once with a message that names the field. The scheduler calls
it again on arrival, defensively, and rejects what fails without letting it near the model: no
request's data can stop the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.runtime.frontend.errors import InvalidRequestError
from plait.runtime.frontend.messages import GenerateRequest
from plait.sampling_params import SamplingParamsError


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this model and server."""

    context_length: int  # prompt + output tokens
    vocab_size: int  # the logits' width; token ids are in [0, vocab_size)
    max_total_tokens: int  # the KV pool; a prompt must fit it
    grammar_backend: str | None = None  # checks a constraint's syntax (None: no check here)
    max_top_logprobs: int = 20  # top alternatives per position (OpenAI's cap)
    max_token_ids_logprob: int = 256  # ids in `token_ids_logprob`
    max_stop_strings: int = 64
    max_stop_string_chars: int = 512  # each stop string is matched against the text's tail every token
    max_stop_token_ids: int = 1024
    max_n: int = 128  # samples per prompt
    max_sequences: int = 1024  # sequences per call, after batch and n expansion
    max_rid_chars: int = 256


def validate(r: GenerateRequest, limits: Limits, *, check_grammar: bool = True) -> None:
    """Raise InvalidRequestError if the scheduler cannot run `r` as asked. `check_grammar`: also
    parse its constraint (the scheduler skips it: it compiles the constraint anyway)."""
    if not isinstance(r.rid, str) or not r.rid:
        raise InvalidRequestError("rid must be a non-empty string", param="rid")
    if len(r.rid) > limits.max_rid_chars:
        raise InvalidRequestError(f"rid is longer than {limits.max_rid_chars} characters", param="rid")
    for name in ("workflow_id", "agent"):
        value = getattr(r, name)
        if value is not None and (not isinstance(value, str) or len(value) > limits.max_rid_chars):
            raise InvalidRequestError(f"{name} must be a string of at most {limits.max_rid_chars} characters",
                                      param=name)
    _check_prompt(r, limits)
    _check_sampling(r, limits, check_grammar=check_grammar)
    _check_logprobs(r, limits)


def _check_prompt(r: GenerateRequest, limits: Limits) -> None:
    prompt_len, context = len(r.input_ids), limits.context_length
    if prompt_len == 0:
        raise InvalidRequestError("the prompt is empty")
    bad = next((t for t in r.input_ids if not (_is_int(t) and 0 <= t < limits.vocab_size)), None)
    if bad is not None:
        raise InvalidRequestError(f"input_ids: token id {bad} is outside the vocabulary [0, {limits.vocab_size})",
                                  param="input_ids")
    if prompt_len >= context:
        raise InvalidRequestError(
            f"the prompt has {prompt_len} tokens, which does not fit the model's context length of {context}"
            " tokens (at least one must be left to generate)")
    max_new = r.sampling_params.max_new_tokens
    if max_new is not None and prompt_len + max_new > context:
        raise InvalidRequestError(
            f"the prompt ({prompt_len} tokens) plus the requested completion ({max_new} tokens) is longer than"
            f" the model's context length of {context} tokens", param="max_new_tokens")
    if prompt_len + 1 > limits.max_total_tokens:
        raise InvalidRequestError(
            f"the prompt has {prompt_len} tokens, more than the KV cache holds ({limits.max_total_tokens})")


def _check_sampling(r: GenerateRequest, limits: Limits, *, check_grammar: bool) -> None:
    p = r.sampling_params
    try:
        p.check_types()
        p.verify(vocab_size=limits.vocab_size)
    except SamplingParamsError as e:
        raise InvalidRequestError(str(e), param="sampling_params") from None
    if p.n != 1:
        raise InvalidRequestError("n must be expanded by the front end before a request is sent")
    if len(p.stop) > limits.max_stop_strings:
        raise InvalidRequestError(f"stop: at most {limits.max_stop_strings} stop strings, got {len(p.stop)}",
                                  param="stop")
    longest = max((len(s) for s in p.stop), default=0)
    if longest > limits.max_stop_string_chars:
        raise InvalidRequestError(
            f"stop: a stop string may have at most {limits.max_stop_string_chars} characters, got {longest}",
            param="stop")
    if len(p.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidRequestError(
            f"stop_token_ids: at most {limits.max_stop_token_ids} ids, got {len(p.stop_token_ids)}",
            param="stop_token_ids")
    if p.min_new_tokens >= limits.context_length:
        raise InvalidRequestError(
            f"min_new_tokens ({p.min_new_tokens}) must be below the context length ({limits.context_length})",
            param="min_new_tokens")
    if check_grammar and limits.grammar_backend is not None:
        from plait.runtime.constrained.base import validate_constraint

        try:
            validate_constraint(p, limits.grammar_backend)  # a syntax check; the scheduler compiles off its loop
        except ValueError as e:  # GrammarError, or a backend that cannot be loaded
            raise InvalidRequestError(str(e)) from None


def _check_logprobs(r: GenerateRequest, limits: Limits) -> None:
    if not isinstance(r.return_logprob, bool) or not isinstance(r.return_text_in_logprobs, bool):
        raise InvalidRequestError("return_logprob and return_text_in_logprobs must be booleans")
    if not _is_int(r.top_logprobs_num) or not 0 <= r.top_logprobs_num <= limits.max_top_logprobs:
        raise InvalidRequestError(
            f"top_logprobs_num must be in [0, {limits.max_top_logprobs}], got {r.top_logprobs_num}",
            param="top_logprobs_num")
    prompt_len = len(r.input_ids)
    start = r.logprob_start_len
    if not _is_int(start) or not -1 <= start < prompt_len:
        raise InvalidRequestError(
            f"logprob_start_len must be -1 (output tokens only) or a prompt position in [0, {prompt_len}),"
            f" got {start}", param="logprob_start_len")
    ids = r.token_ids_logprob
    if ids is not None:
        if len(ids) > limits.max_token_ids_logprob:
            raise InvalidRequestError(
                f"token_ids_logprob: at most {limits.max_token_ids_logprob} ids, got {len(ids)}",
                param="token_ids_logprob")
        bad = next((t for t in ids if not (_is_int(t) and 0 <= t < limits.vocab_size)), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token_ids_logprob: token id {bad} is outside the vocabulary [0, {limits.vocab_size})",
                param="token_ids_logprob")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
