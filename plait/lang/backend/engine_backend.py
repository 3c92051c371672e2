"""The in-process backend: frontend programs on a `plait.Engine`, without HTTP.

`plait.set_default_backend(plait.Engine(...))` wraps the engine in this automatically.
"""

from __future__ import annotations

from typing import Any, Iterator

from plait.lang.backend.srt import GenerateProtocolBackend
from plait.lang.chat_template import (
    ChatTemplate,
    chat_template_from_jinja,
    get_chat_template,
    get_chat_template_by_model_path,
)

_WRAPPER_ATTR = "_plait_lang_backend"


class EngineBackend(GenerateProtocolBackend):
    incremental_streaming_output = False  # Engine streams cumulative snapshots

    def __init__(self, engine: Any, chat_template_name: str | None = None):
        super().__init__()
        self.engine = engine
        self.chat_template = (get_chat_template(chat_template_name) if chat_template_name
                              else template_for_tokenizer(engine.tokenizer, self.get_model_name()))

    @classmethod
    def for_engine(cls, engine: Any) -> EngineBackend:
        """One wrapper per engine, so repeated `set_default_backend(engine)` reuse it. (Kept on the
        engine itself: a weak-keyed table would keep the engine alive through its own wrapper.)"""
        backend = getattr(engine, _WRAPPER_ATTR, None)
        if backend is None:
            backend = cls(engine)
            setattr(engine, _WRAPPER_ATTR, backend)
        return backend

    def _generate(self, body: dict[str, Any]) -> Any:
        return self.engine.generate(**_engine_kwargs(body))

    def _generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.engine.generate(**_engine_kwargs(body))

    def prompt_len(self, s: Any) -> int:
        if s.images_:
            return super().prompt_len(s)
        return len(self.engine.tokenizer.encode(s.text_))  # as the engine tokenizes a text prompt

    def get_model_name(self) -> str:
        return str(self.engine.runner.source.path)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return self.engine.get_server_info()

    def shutdown(self) -> None:
        self.engine.shutdown()


def _engine_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(body)
    if "image_data" in kwargs:
        raise NotImplementedError("the in-process engine does not serve images yet")
    kwargs["prompt"] = kwargs.pop("text", None)
    return kwargs


def template_for_tokenizer(tokenizer: Any, model_path: str | None) -> ChatTemplate:
    """Derived from the tokenizer's Jinja template when it has the usual shape, else by model path."""
    if getattr(tokenizer, "chat_template", None):
        bos = ""
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is not None and tokenizer.encode("a")[:1] == [bos_id]:
            bos = tokenizer.backend.bos_token or ""  # the engine adds this token itself when it tokenizes

        def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            return text[len(bos):] if bos and text.startswith(bos) else text

        derived = chat_template_from_jinja(render, name=f"derived:{model_path}")
        if derived is not None:
            return derived
    return get_chat_template_by_model_path(model_path)
