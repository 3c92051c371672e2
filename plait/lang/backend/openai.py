"""`OpenAI`: the frontend on any OpenAI-compatible endpoint, through the official client.

Chat models get `s.messages_` (a gen must come right after the assistant role begins, unless
API speculative execution is on, see spec.py); completion models get the whole transcript.
`token_usage` adds up the prompt and completion tokens the API reports, so the saving of
speculative execution is visible. With `sglang_extensions` (default: when `base_url` points
somewhere other than api.openai.com) Plait/SGLang-only sampling fields go in `extra_body`.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

from plait.lang.backend.base import BaseBackend
from plait.lang.chat_template import ChatTemplate, get_chat_template
from plait.lang.workflow import hint_fields
from plait.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from plait.lang.params import GenParams
from plait.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

INSTRUCT_MODEL_NAMES = ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002")
_RETRYABLE = ("APIConnectionError", "APITimeoutError", "RateLimitError", "InternalServerError")
_DEFAULTS = SamplingParams()
# SamplingParams fields the OpenAI API itself has (mapped in _sampling_kwargs); the rest are extensions.
_OPENAI_NATIVE = frozenset({"max_new_tokens", "n", "stop", "temperature", "top_p", "frequency_penalty",
                            "presence_penalty", "seed", "logit_bias", "json_schema"})
_EXTRA_BODY_NAMES = {"min_new_tokens": "min_tokens"}


@dataclass
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens the server served from its prefix cache (`usage.prompt_tokens_details.cached_tokens`);
    # None until a response reports them (not every server does).
    cached_tokens: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, usage: Any) -> None:
        if usage is None:
            return
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        with self._lock:
            self.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
            self.completion_tokens += getattr(usage, "completion_tokens", 0) or 0
            if cached is not None:
                self.cached_tokens = (self.cached_tokens or 0) + cached

    def reset(self) -> None:
        with self._lock:
            self.prompt_tokens = self.completion_tokens = 0
            self.cached_tokens = None


class OpenAI(BaseBackend):
    def __init__(self, model_name: str, is_chat_model: bool | None = None,
                 chat_template: ChatTemplate | str | None = None, is_azure: bool = False, *args: Any,
                 client: Any = None, sglang_extensions: bool | None = None, max_retries: int = 3,
                 retry_sleep: float = 5.0, **kwargs: Any):
        super().__init__()
        if client is None:
            import openai

            client = (openai.AzureOpenAI if is_azure else openai.OpenAI)(*args, **kwargs)
        self.client = client
        self.model_name = model_name
        self.is_chat_model = model_name not in INSTRUCT_MODEL_NAMES if is_chat_model is None else is_chat_model
        if isinstance(chat_template, str):
            chat_template = get_chat_template(chat_template)
        self.chat_template = chat_template or get_chat_template("default")
        if sglang_extensions is None:
            base_url = str(kwargs.get("base_url") or getattr(client, "base_url", "") or "")
            sglang_extensions = bool(base_url) and "api.openai.com" not in base_url
        self.sglang_extensions = sglang_extensions
        self.max_retries = max_retries
        self.retry_sleep = retry_sleep
        self.token_usage = TokenUsage()

    def get_model_name(self) -> str:
        return self.model_name

    # ---- request building ---------------------------------------------------------------------
    def _sampling_kwargs(self, params: GenParams, s: Any = None) -> dict[str, Any]:
        sp = params.sampling
        token_key = "max_completion_tokens" if self.model_name.startswith(("o1", "o3", "o4")) else "max_tokens"
        kw: dict[str, Any] = {token_key: sp.max_new_tokens, "n": sp.n, "stop": list(sp.stop) or None,
                              "temperature": sp.temperature, "top_p": sp.top_p,
                              "frequency_penalty": sp.frequency_penalty, "presence_penalty": sp.presence_penalty}
        if sp.seed is not None:
            kw["seed"] = sp.seed
        if sp.logit_bias:
            kw["logit_bias"] = {str(k): v for k, v in sp.logit_bias.items()}
        if sp.json_schema is not None and self.is_chat_model:
            import json

            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": json.loads(sp.json_schema)}}
        extra = {}
        if self.sglang_extensions:
            # Only what differs from the defaults, so a plain OpenAI-compatible server is not confused.
            for name in SamplingParams.field_names():
                value = getattr(sp, name)
                if name not in _OPENAI_NATIVE and value != getattr(_DEFAULTS, name):
                    extra[_EXTRA_BODY_NAMES.get(name, name)] = value
            if sp.json_schema is not None and not self.is_chat_model:
                extra["json_schema"] = sp.json_schema
            extra.update(hint_fields(getattr(s, "workflow_hint", None)))  # agent workflows (plait.lang.workflow)
        elif sp.regex is not None or (sp.json_schema is not None and not self.is_chat_model):
            warnings.warn("this OpenAI backend ignores regex/json_schema constraints", stacklevel=4)
        if extra:
            kw["extra_body"] = extra
        return kw

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        for attempt in range(self.max_retries):
            try:
                return fn(**kwargs)
            except Exception as e:
                if type(e).__name__ not in _RETRYABLE or attempt == self.max_retries - 1:
                    raise
                logger.warning("OpenAI call failed (%s); retrying in %.0f s", e, self.retry_sleep)
                time.sleep(self.retry_sleep)
        raise AssertionError("unreachable")

    def _check_chat_position(self, s: Any) -> None:
        if s.cur_role != "assistant" or s.text_[s.cur_role_begin_pos:].strip():
            raise RuntimeError(
                "This use case is not supported if api speculative execution is off. For OpenAI chat models, "
                "sgl.gen must be right after sgl.assistant. Example of adding api speculative execution: "
                "@function(num_api_spec_tokens=128)."
            )

    # ---- the backend interface ----------------------------------------------------------------
    def generate(self, s: Any, sampling_params: GenParams) -> tuple[Any, Any]:
        kw = self._sampling_kwargs(sampling_params, s)
        if self.is_chat_model:
            if sampling_params.dtype is not None:
                raise NotImplementedError("dtype is not supported for OpenAI chat models")
            self._check_chat_position(s)
            resp = self._call(self.client.chat.completions.create, model=self.model_name, messages=s.messages_, **kw)
            texts = [c.message.content or "" for c in resp.choices]
        else:
            prompt, stop, wrap = s.text_, kw["stop"] or [], ""
            if sampling_params.dtype == "str":
                prompt, wrap = prompt + '"', '"'
                stop = stop + ['"']
            elif sampling_params.dtype in ("int", "float"):
                stop = stop + [x for x in (" ", "\n") if x not in stop]
            kw["stop"] = stop or None
            resp = self._call(self.client.completions.create, model=self.model_name, prompt=prompt, **kw)
            texts = [wrap + c.text + wrap for c in resp.choices]
        self.token_usage.add(getattr(resp, "usage", None))
        meta = {"finish_reason": getattr(resp.choices[0], "finish_reason", None)}
        return (texts if sampling_params.sampling.n > 1 else texts[0]), meta

    def generate_stream(self, s: Any, sampling_params: GenParams) -> Iterator[tuple[str, dict]]:
        kw = self._sampling_kwargs(sampling_params, s)
        kw["n"] = 1
        if self.is_chat_model:
            self._check_chat_position(s)
            stream = self._call(self.client.chat.completions.create, model=self.model_name, messages=s.messages_,
                                stream=True, stream_options={"include_usage": True}, **kw)
        else:
            stream = self._call(self.client.completions.create, model=self.model_name, prompt=s.text_,
                                stream=True, stream_options={"include_usage": True}, **kw)
        for chunk in stream:
            self.token_usage.add(getattr(chunk, "usage", None))
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            delta = (choice.delta.content if self.is_chat_model else choice.text) or ""
            if delta:
                yield delta, {}

    def select(self, s: Any, choices: list[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        """Completion models: score each prompt+choice with echoed prompt logprobs, one request."""
        if self.is_chat_model:
            raise NotImplementedError("select is not supported for OpenAI chat models")
        prompts = [s.text_ + c for c in choices]
        resp = self._call(self.client.completions.create, model=self.model_name, prompt=prompts, max_tokens=1,
                          echo=True, logprobs=1, temperature=0)
        self.token_usage.add(getattr(resp, "usage", None))
        by_index = sorted(resp.choices, key=lambda c: c.index)
        input_lps = []
        start = len(s.text_)
        for c, prompt in zip(by_index, prompts, strict=True):
            lp = c.logprobs
            # The choice's tokens: those ending after the prompt (a straddling token counts) and
            # starting before the generated token.
            entries = zip(lp.tokens, lp.token_logprobs, lp.text_offset, strict=True)
            input_lps.append([[value, None, tok] for tok, value, off in entries
                              if off + len(tok) > start and off < len(prompt)])
        normalized = []
        for entries in input_lps:
            values = [e[0] for e in entries if e[0] is not None]
            normalized.append(sum(values) / len(values) if values else float("-inf"))
        return choices_method(choices=choices, normalized_prompt_logprobs=normalized, input_token_logprobs=input_lps,
                              output_token_logprobs=[[] for _ in choices], unconditional_token_logprobs=None)
