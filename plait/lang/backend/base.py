"""The one interface every frontend backend implements.

The interpreter calls these with `s`, the program's executor, which exposes `text_` (the whole
transcript), `messages_`, `images_`, `cur_images`, `cur_role`, `cur_role_begin_pos`, `sid`,
`variables` and `meta_info`. Every generation call sends the *whole* transcript: the runtime's
prefix cache, not the frontend, makes that cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from plait.lang.chat_template import ChatTemplate, get_chat_template

if TYPE_CHECKING:
    from plait.lang.choices import ChoicesDecision, ChoicesSamplingMethod
    from plait.lang.params import GenParams


class BaseBackend:
    """Defaults: no caching hints, the "default" chat template. A bare instance is the tracer's dummy."""

    is_chat_model = False
    support_concate_and_append = False

    def __init__(self) -> None:
        self.chat_template: ChatTemplate = get_chat_template("default")

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def get_model_name(self) -> str:
        raise NotImplementedError

    # ---- hints; backends without a prefix cache ignore them -----------------------------------
    def cache_prefix(self, prefix_str: str) -> None:
        """Prefill `prefix_str` so later requests starting with it hit the cache."""

    def uncache_prefix(self, rid: str) -> None:
        pass

    def commit_lazy_operations(self, s: Any) -> None:
        """Prefill the transcript so far (sent before a fork so every branch hits the cache)."""

    def fork_program(self, src: Any, dst_rids: list[str], position_ids_offset: Any = None) -> None:
        pass

    def fill_image(self, s: Any) -> None:
        pass

    def begin_program(self, s: Any) -> None:
        pass

    def end_program(self, s: Any) -> None:
        pass

    def end_request(self, rid: str | list[str]) -> None:
        pass

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, s: Any, sampling_params: GenParams) -> tuple[str | list[str], dict | list[dict]]:
        """Complete `s.text_`. Returns (text, meta_info), or lists of both when `n > 1`."""
        raise NotImplementedError

    def generate_stream(self, s: Any, sampling_params: GenParams) -> Iterator[tuple[str, dict]]:
        """Yield (new text, current meta_info) pieces of one completion."""
        raise NotImplementedError

    def select(self, s: Any, choices: list[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        raise NotImplementedError

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        raise NotImplementedError

    # ---- administration -----------------------------------------------------------------------
    def flush_cache(self) -> Any:
        return None

    def get_server_info(self) -> Any:
        return None

    def shutdown(self) -> None:
        pass


def as_backend(obj: Any) -> BaseBackend:
    """Anything usable as a backend: a backend; a `Runtime` (its `.endpoint`); a `plait.Engine`
    (wrapped in-process, one wrapper per engine)."""
    if isinstance(obj, BaseBackend):
        return obj
    endpoint = getattr(obj, "endpoint", None)
    if isinstance(endpoint, BaseBackend):
        return endpoint
    if type(obj).__module__ == "plait.runtime.engine" and type(obj).__name__ == "Engine":
        from plait.lang.backend.engine_backend import EngineBackend

        return EngineBackend.for_engine(obj)
    raise TypeError(f"{type(obj).__name__} is not a frontend backend")
