"""The tokenizer wrapper: one object for encoding, decoding, chat templates and stop tokens.

It wraps a fast tokenizer (`.backend`, used directly by the detokenizer): transformers'
`PreTrainedTokenizerFast`, or for the tokenizers Plait saves itself (a GGUF file's) a `FastTokenizer`
over the `tokenizers` library alone, which keeps transformers out of start-up. `.hf` is always a
transformers tokenizer, built on first use where the backend is not one (grammar backends take it).
It adds the two things the runtime needs that HF spreads over several files: the full list of
end-of-sequence ids and the chat template, either of which a user may override.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from plait.runtime.chat_template import is_plain, render
from plait.runtime.fast_tokenizer import FastTokenizer
from plait.runtime.model_loader.source import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokens that end an assistant turn in common chat formats (ChatML, Llama 3, Phi-3, Gemma).
# A model emits these, not its pretraining EOS, when it finishes a reply; GGUF files converted
# from a base tokenizer often name `<|endoftext|>` as EOS, so without this generation would run
# on past the end of the turn. We add one only when the chat template actually writes it.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """Encoding/decoding plus the model's stop ids and chat template.

    `eos_token_ids` = the tokenizer's EOS, then `extra_eos_token_ids` (e.g. generation_config's),
    then any turn-end token the chat template uses; no duplicates, order kept.
    """

    def __init__(
        self,
        hf: PreTrainedTokenizerBase | FastTokenizer,
        *,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ):
        self.backend = hf
        self._hf = None if isinstance(hf, FastTokenizer) else hf
        if chat_template is not None:
            self.backend.chat_template = load_chat_template(chat_template)
        eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
        eos += list(extra_eos_token_ids)
        eos += self._turn_end_token_ids()
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(i) for i in eos))

    @classmethod
    def from_folder(
        cls, path: str, *, chat_template: str | None = None, extra_eos_token_ids: Iterable[int] = ()
    ) -> Tokenizer:
        """Load `tokenizer.json`/`tokenizer_config.json` (and `chat_template.jinja`) from a local folder."""
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types here; all mean "cannot read it"
            raise ModelLoadError(f"{path}: cannot load tokenizer: {e}") from e
        # Older transformers do not read chat_template.jinja on their own.
        jinja_path = os.path.join(path, "chat_template.jinja")
        if not hf.chat_template and os.path.isfile(jinja_path):
            hf.chat_template = load_chat_template(jinja_path)
        return cls(hf, extra_eos_token_ids=extra_eos_token_ids, chat_template=chat_template)

    @classmethod
    def from_gguf(
        cls, path: str, *, chat_template: str | None = None, extra_eos_token_ids: Iterable[int] = ()
    ) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's metadata (vocab, merges, specials, template).

        Building it parses the whole vocabulary out of the file (seconds for a 49k-token one), so the
        result is saved once under the cache folder (`$PLAIT_CACHE_DIR/tokenizers/`, keyed by the file's
        name, size and modification time and the transformers version) and read from there afterwards.
        """
        cached = _gguf_tokenizer_cache(path)
        if cached is not None:
            # The saved folder, read without transformers (see fast_tokenizer.py).
            from plait.runtime import fast_tokenizer

            fast = fast_tokenizer.load(cached)
            if fast is not None:
                return cls(fast, extra_eos_token_ids=extra_eos_token_ids, chat_template=chat_template)
        from transformers import PreTrainedTokenizerFast

        hf = None
        if cached is not None and os.path.isfile(os.path.join(cached, "tokenizer.json")):
            try:
                hf = PreTrainedTokenizerFast.from_pretrained(cached, local_files_only=True)
            except Exception:  # an unreadable cache entry is rebuilt below
                hf = None
        if hf is None:
            folder, name = os.path.split(os.path.abspath(path))
            try:
                # The concrete fast class, not AutoTokenizer: Auto would first parse the whole file
                # again just to build a model config it does not need.
                hf = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name, local_files_only=True)
            except Exception as e:
                raise ModelLoadError(f"{path}: cannot build a tokenizer from the GGUF metadata: {e}") from e
            if cached is not None:
                _save_atomically(hf, cached)
        return cls(hf, extra_eos_token_ids=extra_eos_token_ids, chat_template=chat_template)

    @property
    def hf(self) -> PreTrainedTokenizerBase:
        """transformers' tokenizer (grammar backends and other libraries take one); where the backend is
        a `FastTokenizer`, built from the same folder on first use, which imports transformers."""
        if self._hf is None:
            self._hf = self.backend.to_transformers()
        return self._hf

    def __getstate__(self) -> dict[str, Any]:
        # A transformers tokenizer built from a FastTokenizer stays behind: unpickling it would import
        # transformers in the receiving process (the server's HTTP process gets this object).
        state = dict(self.__dict__)
        if isinstance(self.backend, FastTokenizer):
            state["_hf"] = None
        return state

    # ---- properties -------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        template = self.backend.chat_template
        if isinstance(template, dict):  # named templates (older tokenizer_config.json)
            template = template.get("default") or next(iter(template.values()), None)
        return template or None

    @property
    def bos_token_id(self) -> int | None:
        return self.backend.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.backend.pad_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (may be below the model's padded vocab_size)."""
        return len(self.backend)

    # ---- text <-> ids -----------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens)

    def decode(
        self, ids: list[int], *, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
    ) -> str:
        return self.backend.decode(
            ids, skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=spaces_between_special_tokens
        )

    def id_to_token_text(self, token_id: int) -> str:
        """The decoded text of one token (a partial UTF-8 byte decodes to U+FFFD)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, tools: Any = None, **kw: Any
    ) -> str:
        """Render messages to the prompt string (not ids: the caller encodes with add_special_tokens=False)."""
        if self.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template; pass one with --chat-template")
        fast = self.backend if isinstance(self.backend, FastTokenizer) else None
        if fast is not None and isinstance(fast.chat_template, str) and is_plain([messages, tools, kw]):
            return render(fast.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                          **{**fast.special_tokens_map, **kw})
        return self.hf.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **kw
        )

    def _turn_end_token_ids(self) -> list[int]:
        template = self.chat_template or ""
        ids = []
        for token in _TURN_END_TOKENS:
            if token not in template:
                continue
            token_id = self.backend.convert_tokens_to_ids(token)
            if token_id is not None and self.backend.convert_ids_to_tokens(token_id) == token:
                ids.append(token_id)
        return ids


def load_chat_template(template_or_path: str) -> str:
    """A chat template given inline (a jinja string) or as a path to a file holding one."""
    if os.path.isfile(template_or_path):
        with open(template_or_path, encoding="utf-8") as f:
            return f.read()
    if "{" not in template_or_path:
        raise ModelLoadError(f"chat template {template_or_path!r} is neither a file nor a jinja template")
    return template_or_path


def _gguf_tokenizer_cache(path: str) -> str | None:
    """The cache folder for the tokenizer built from this GGUF file (None if the file cannot be stat'ed)."""
    from importlib.metadata import version

    from plait.runtime.model_loader.default_model import cache_dir

    try:
        st = os.stat(path)
    except OSError:
        return None
    stem = os.path.basename(path).removesuffix(".gguf")
    return os.path.join(cache_dir(), "tokenizers", f"{stem}-{st.st_size}-{st.st_mtime_ns}-tf{version('transformers')}")


def _save_atomically(hf: PreTrainedTokenizerBase, folder: str) -> None:
    """Save into a fresh folder beside `folder`, then rename it into place; a failure only costs speed."""
    import shutil
    import tempfile

    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".save-")
    except OSError:  # a read-only cache folder
        return
    try:
        hf.save_pretrained(tmp)
        os.rename(tmp, folder)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
