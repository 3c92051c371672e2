"""A tokenizer folder read with the `tokenizers` library alone, without transformers.

`import transformers` costs 1-1.5 s of CPU before any tokenizer is built (seconds more in a process
that also imports torch), and every process of a server holds a tokenizer. For the folders Plait saves
itself (a GGUF file's tokenizer, cached by `Tokenizer.from_gguf`) the fast tokenizer is all there is:
`tokenizer.json` holds the model, the added tokens and the post-processor, and `tokenizer_config.json`
only names the special tokens. `FastTokenizer` answers the part of transformers'
`PreTrainedTokenizerFast` that the runtime uses, the same way; a folder whose config asks for
anything more is left to transformers (`load` returns None).
"""

from __future__ import annotations

import json
import os
from typing import Any

# `tokenizer_config.json` keys whose effect FastTokenizer reproduces (or that have none on encoding,
# decoding and chat templates). Any other key sends the folder to transformers.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_HARMLESS_KEYS = {"backend", "tokenizer_class", "is_local", "local_files_only", "model_max_length",
                  "chat_template", "extra_special_tokens", "additional_special_tokens",
                  "clean_up_tokenization_spaces", "model_input_names", "padding_side", "truncation_side"}
_TOKENIZER_CLASSES = {None, "TokenizersBackend", "PreTrainedTokenizerFast"}


def load(folder: str) -> FastTokenizer | None:
    """The folder's tokenizer, or None when it needs transformers (or is missing or unreadable)."""
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(config, dict) or set(config) - _HARMLESS_KEYS - set(_SPECIAL_TOKEN_KEYS)
            or config.get("tokenizer_class") not in _TOKENIZER_CLASSES
            or config.get("clean_up_tokenization_spaces", False)):
        return None
    from tokenizers import Tokenizer as RustTokenizer

    try:
        backend = RustTokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    except Exception:  # a missing or corrupt file: transformers would fail on it too, and say why
        return None
    chat_template = config.get("chat_template")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            chat_template = f.read()
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # named extra tokens (multimodal models)
        return None
    special = {k: _content(config[k]) for k in _SPECIAL_TOKEN_KEYS if config.get(k) is not None}
    return FastTokenizer(backend, special, [_content(t) for t in extra], chat_template, folder)


def _content(token: Any) -> str:
    """A special token as written in the config: a string, or an AddedToken's dict."""
    return token["content"] if isinstance(token, dict) else str(token)


class FastTokenizer:
    """The subset of `PreTrainedTokenizerFast` that Plait uses, over a `tokenizers.Tokenizer`."""

    def __init__(self, backend: Any, special_tokens: dict[str, str], extra_special_tokens: list[str],
                 chat_template: str | None, folder: str):
        self.backend_tokenizer = backend
        self.special_tokens_map = special_tokens  # bos_token, eos_token, ... -> the token's text
        self.extra_special_tokens = extra_special_tokens
        self.chat_template = chat_template
        self.folder = folder  # where it was read from: `to_transformers` reads it again

    # ---- special tokens, as transformers names them --------------------------------------------
    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token = property(lambda self: self.special_tokens_map.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens_map.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens_map.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens_map.get("unk_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return self.backend_tokenizer.get_added_tokens_decoder()

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: int | list[int], skip_special_tokens: bool = False, **_: Any) -> str:
        """As transformers' fast decode: `spaces_between_special_tokens` does nothing there either, and
        `clean_up_tokenization_spaces` is off (`load` checked)."""
        return self.backend_tokenizer.decode([ids] if isinstance(ids, int) else list(ids),
                                             skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            index = self.backend_tokenizer.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    # ---- chat templates and the rest ---------------------------------------------------------------
    def to_transformers(self) -> Any:
        """The same tokenizer as transformers' `PreTrainedTokenizerFast` (for grammar backends and other
        libraries that take one); this imports transformers."""
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast.from_pretrained(self.folder, local_files_only=True)
        hf.chat_template = self.chat_template
        return hf
