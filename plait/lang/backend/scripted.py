"""`ScriptedBackend`: a deterministic backend with no model, for testing programs.

Answers come from `respond(prompt, params) -> str` (default: `"<gen i>"`); select scores come
from `score(prompt, choice) -> list of token logprobs` (default: one token per character, each
-1). Every call is recorded in `calls` as `(kind, prompt, detail)`. Set `gate` (a
`threading.Event`) to hold generation until the test releases it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

from plait.lang.backend.base import BaseBackend
from plait.lang.chat_template import ChatTemplate, get_chat_template
from plait.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from plait.lang.params import GenParams


class ScriptedBackend(BaseBackend):
    def __init__(self, respond: Callable[[str, GenParams], str] | None = None,
                 score: Callable[[str, str], list[float]] | None = None,
                 chat_template: ChatTemplate | str | None = None, stream_chunk_chars: int = 2,
                 stream_delay_s: float = 0.0):
        super().__init__()
        self.respond = respond or self._numbered
        self.score = score or (lambda prompt, choice: [-1.0] * max(len(choice), 1))
        if isinstance(chat_template, str):
            chat_template = get_chat_template(chat_template)
        self.chat_template = chat_template or get_chat_template("default")
        self.stream_chunk_chars = stream_chunk_chars
        self.stream_delay_s = stream_delay_s
        self.calls: list[tuple[str, str, Any]] = []
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()
        self._count = 0

    def _numbered(self, prompt: str, params: GenParams) -> str:
        with self._lock:
            self._count += 1
            return f"<gen {self._count}>"

    def _record(self, kind: str, prompt: str, detail: Any) -> None:
        with self._lock:
            self.calls.append((kind, prompt, detail))

    def _answer(self, s: Any, params: GenParams) -> str:
        if self.gate is not None:
            self.gate.wait()
        self._record("generate", s.text_, params)
        return self.respond(s.text_, params)

    def generate(self, s: Any, sampling_params: GenParams) -> tuple[Any, Any]:
        n = sampling_params.sampling.n
        texts = [self._answer(s, sampling_params) for _ in range(n)]
        meta = {"prompt_tokens": len(s.text_), "completion_tokens": sum(map(len, texts))}
        return (texts if n > 1 else texts[0]), meta

    def generate_stream(self, s: Any, sampling_params: GenParams) -> Iterator[tuple[str, dict]]:
        text = self._answer(s, sampling_params)
        step = self.stream_chunk_chars
        for i in range(0, len(text), step):
            time.sleep(self.stream_delay_s)
            yield text[i:i + step], {"completion_tokens": min(i + step, len(text))}

    def select(self, s: Any, choices: list[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        self._record("select", s.text_, list(choices))
        input_lps = [[[lp, None, None] for lp in self.score(s.text_, c)] for c in choices]
        unconditional = [[[lp, None, None] for lp in self.score("", c)] for c in choices]
        normalized = [sum(e[0] for e in lps) / len(lps) for lps in input_lps]
        return choices_method(choices=choices, normalized_prompt_logprobs=normalized, input_token_logprobs=input_lps,
                              output_token_logprobs=[[] for _ in choices],
                              unconditional_token_logprobs=unconditional)

    def cache_prefix(self, prefix_str: str) -> None:
        self._record("cache_prefix", prefix_str, None)

    def commit_lazy_operations(self, s: Any) -> None:
        self._record("commit", s.text_, None)
