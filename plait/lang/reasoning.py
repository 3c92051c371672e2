"""Splitting a reasoning model's output into its thinking and its answer (`separate_reasoning`).

Each model family marks its thinking with a start and an end tag. Some (DeepSeek-R1, Qwen3 in
thinking mode, Kimi) put the start tag in the prompt, so their output begins inside the
thinking: for those everything before the end tag is reasoning even without a start tag.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningFormat:
    start: str = "<think>"
    end: str = "</think>"
    starts_in_reasoning: bool = False


FORMATS: dict[str, ReasoningFormat] = {
    "deepseek-r1": ReasoningFormat(starts_in_reasoning=True),
    "deepseek-v3": ReasoningFormat(),
    "qwen3": ReasoningFormat(),
    "qwen3-thinking": ReasoningFormat(starts_in_reasoning=True),
    "glm45": ReasoningFormat(),
    "kimi": ReasoningFormat("◁think▷", "◁/think▷", starts_in_reasoning=True),
    "step3": ReasoningFormat(starts_in_reasoning=True),
}


class ReasoningParser:
    def __init__(self, model_type: str):
        if model_type not in FORMATS:
            raise ValueError(f"unknown reasoning model type {model_type!r}; known: {', '.join(sorted(FORMATS))}")
        self.format = FORMATS[model_type]

    def parse_non_stream(self, text: str) -> tuple[str, str]:
        """(reasoning, answer); text without reasoning markup is all answer."""
        f = self.format
        body = text.lstrip()
        has_start = body.startswith(f.start)
        if has_start:
            body = body[len(f.start):]
        elif not f.starts_in_reasoning:
            return "", text
        if f.end not in body:
            # Thinking that never closed (cut by max tokens): all of it is reasoning.
            return (body.strip(), "") if has_start or f.starts_in_reasoning else ("", text)
        reasoning, answer = body.split(f.end, 1)
        return reasoning.strip(), answer.lstrip()
