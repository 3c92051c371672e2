"""The primitives of the frontend language, with SGLang's names and argument order.

Each returns an IR node (ir.py) to append with `s += ...`. Generation arguments left as None
inherit the program's defaults (the sampling keywords of `run`).
"""

from __future__ import annotations

from typing import Any, Callable

from plait.lang import ir
from plait.lang.backend.base import as_backend
from plait.lang.choices import ChoicesSamplingMethod, token_length_normalized
from plait.lang.function import SglFunction
from plait.lang.global_config import global_config
from plait.lang.params import GenOverrides


def function(func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None) -> Any:
    """`@function` or `@function(num_api_spec_tokens=64)`: make a program of `func(s, ...)`."""
    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
    return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)


def set_default_backend(backend: Any) -> None:
    """Kept as given (a `Runtime` stays a `Runtime`, as SGLang programs expect: they read
    `global_config.default_backend.endpoint`); unwrapped wherever it is used."""
    as_backend(backend)  # reject what can never be a backend now, not at the first run
    global_config.default_backend = backend


def flush_cache(backend: Any = None) -> Any:
    backend = backend if backend is not None else global_config.default_backend
    return as_backend(backend).flush_cache() if backend is not None else False


def get_server_info(backend: Any = None) -> Any:
    backend = backend if backend is not None else global_config.default_backend
    return as_backend(backend).get_server_info() if backend is not None else None


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: str | None = None,
) -> ir.SglExpr:
    """Generate into variable `name`. With `choices`, this is `select` (temperature 0 by default)."""
    if choices:
        return ir.SglSelect(name, choices, 0.0 if temperature is None else temperature,
                            token_length_normalized if choices_method is None else choices_method)
    given = dict(locals())
    for k in ("name", "choices", "choices_method"):
        del given[k]
    return ir.SglGen(name, GenOverrides.from_kwargs(given))


def gen_int(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> ir.SglExpr:
    """`gen(..., dtype=int)`: an integer (the backend constrains it)."""
    return gen(**locals(), dtype=int)


def gen_string(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> ir.SglExpr:
    """`gen(..., dtype=str)`: a double-quoted string."""
    return gen(**locals(), dtype=str)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method: ChoicesSamplingMethod = token_length_normalized) -> ir.SglSelect:
    """Pick one of `choices` by the likelihood the model gives each (all scored in one request)."""
    if choices is None:
        raise ValueError("select needs choices")
    return ir.SglSelect(name, choices, temperature, choices_method)


def image(expr: Any) -> ir.SglImage:
    return ir.SglImage(expr)


def video(path: str, num_frames: int) -> ir.SglVideo:
    return ir.SglVideo(path, num_frames)


def _role(role: str, expr: Any) -> ir.SglExprList:
    if expr is None:
        return ir.SglExprList([ir.SglRoleBegin(role), ir.SglRoleEnd(role)])
    return ir.SglExprList([ir.SglRoleBegin(role), expr, ir.SglRoleEnd(role)])


def system(expr: Any = None) -> ir.SglExprList:
    return _role("system", expr)


def user(expr: Any = None) -> ir.SglExprList:
    return _role("user", expr)


def assistant(expr: Any = None) -> ir.SglExprList:
    return _role("assistant", expr)


def system_begin() -> ir.SglRoleBegin:
    return ir.SglRoleBegin("system")


def system_end() -> ir.SglRoleEnd:
    return ir.SglRoleEnd("system")


def user_begin() -> ir.SglRoleBegin:
    return ir.SglRoleBegin("user")


def user_end() -> ir.SglRoleEnd:
    return ir.SglRoleEnd("user")


def assistant_begin() -> ir.SglRoleBegin:
    return ir.SglRoleBegin("assistant")


def assistant_end() -> ir.SglRoleEnd:
    return ir.SglRoleEnd("assistant")


def separate_reasoning(expr: Any = None, model_type: str | None = None) -> ir.SglExprList:
    """After `expr` (a named gen) runs, split its text: the thinking goes to
    `<name>_reasoning_content`, the variable keeps the answer."""
    if model_type is None:
        raise ValueError("separate_reasoning needs model_type (e.g. 'deepseek-r1', 'qwen3')")
    return ir.SglExprList([expr, ir.SglSeparateReasoning(model_type, expr)])
