"""Model loading: turn what the user named (a folder, a .gguf file, a preset, nothing) into a `ModelSource`.

    source = resolve_model("path/to/Llama-3.2-1B")        # HF folder, safetensors
    source = resolve_model("model.Q4_0.gguf")             # GGUF, dequantized to float32
    source = resolve_model("llama-3.1-8b", load_format="dummy")  # random weights, real shapes
    source = resolve_model()                              # the default model (SmolLM2-135M-Instruct GGUF)
    model.load_weights(source.iter_weights())

Everything that can be checked without reading the weights (config, architecture, shard headers,
GGUF tensor types) is checked here, so a bad model fails before any memory is spent on it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from plait.runtime.model_loader.default_model import default_model_path
from plait.runtime.model_loader.dummy import PRESETS, param_shapes, preset_config
from plait.runtime.model_loader.source import (
    LOAD_FORMATS,
    SUPPORTED_ARCHITECTURES,
    ModelLoadError,
    ModelSource,
    check_architecture,
    normalize_config,
)

if TYPE_CHECKING:
    from plait.runtime.tokenizer import Tokenizer

__all__ = [
    "LOAD_FORMATS", "PRESETS", "SUPPORTED_ARCHITECTURES", "ModelLoadError", "ModelSource", "default_model_path",
    "param_shapes", "resolve_model",
]


def resolve_model(
    model_path: str | None = None,
    *,
    load_format: str = "auto",
    tokenizer_path: str | None = None,
    chat_template: str | None = None,
) -> ModelSource:
    """Resolve a model and check it is loadable; weights are read later, by `iter_weights()`.

    `model_path`: an HF folder, a `.gguf` file (or a folder holding exactly one), with
    `load_format="dummy"` also a preset name (see `PRESETS`) or a `config.json` (dummy keeps the
    config and tokenizer, and makes the weights random); None or "default" is the default model.
    `tokenizer_path` (a folder or a .gguf) replaces the model's tokenizer; `chat_template`
    (jinja text or a file path) replaces its chat template.
    Raises ModelLoadError with the offending path when anything is missing or unsupported.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format {load_format!r}; choose from {', '.join(LOAD_FORMATS)}")
    if model_path in (None, "", "default"):
        model_path = default_model_path()
    if load_format == "dummy":
        source = _resolve_dummy(model_path)
    else:
        path = os.path.expanduser(model_path)
        if not os.path.exists(path):
            hint = "; it is a preset name: add load_format='dummy'" if model_path.lower() in PRESETS else ""
            raise ModelLoadError(f"{model_path}: no such file or folder{hint}")
        gguf_file = _find_gguf(path, load_format)
        source = _resolve_gguf(gguf_file) if gguf_file else _resolve_folder(path)
    if tokenizer_path is not None:
        source.tokenizer = _load_tokenizer(tokenizer_path, source.generation_config)
    if chat_template is not None:
        if source.tokenizer is None:
            raise ModelLoadError(f"{source.path}: a chat template was given but the model has no tokenizer")
        from plait.runtime.tokenizer import Tokenizer

        source.tokenizer = Tokenizer(source.tokenizer.backend, extra_eos_token_ids=source.tokenizer.eos_token_ids,
                                     chat_template=chat_template)
    return source


def _find_gguf(path: str, load_format: str) -> str | None:
    """The GGUF file to read, or None for a safetensors folder."""
    if os.path.isfile(path):
        if load_format == "safetensors" or not (path.endswith(".gguf") or load_format == "gguf"):
            raise ModelLoadError(f"{path}: a model file must be a .gguf; for safetensors give the folder")
        return path
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    # A folder of GGUF files without an HF config.json is a GGUF download, not a checkpoint.
    auto_gguf = load_format == "auto" and ggufs and not os.path.isfile(os.path.join(path, "config.json"))
    if load_format == "gguf" or auto_gguf:
        if len(ggufs) != 1:
            raise ModelLoadError(f"{path}: expected exactly one .gguf file in the folder, found {len(ggufs)}")
        return os.path.join(path, ggufs[0])
    return None


def _load_tokenizer(path: str, generation_config: dict) -> Tokenizer:
    # Imported here: tokenizer.py imports this package's ModelLoadError.
    from plait.runtime.tokenizer import Tokenizer

    eos = generation_config.get("eos_token_id")
    extra = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: tokenizer path does not exist")
    if os.path.isfile(path):
        return Tokenizer.from_gguf(path, extra_eos_token_ids=extra)
    return Tokenizer.from_folder(path, extra_eos_token_ids=extra)


def _resolve_folder(folder: str) -> ModelSource:
    from plait.runtime.model_loader.hf_folder import (
        has_tokenizer,
        iter_safetensors,
        list_shards,
        read_config,
        read_generation_config,
    )

    config = read_config(folder)
    check_architecture(config, folder)
    config = normalize_config(config, folder)
    generation_config = read_generation_config(folder)
    shards = list_shards(folder)
    tokenizer = _load_tokenizer(folder, generation_config) if has_tokenizer(folder) else None
    return ModelSource(folder, config, generation_config, tokenizer, "safetensors",
                       weight_reader=lambda skip: (w for w in iter_safetensors(shards) if w[0] not in skip))


def _resolve_gguf(path: str) -> ModelSource:
    from plait.runtime.model_loader.gguf_file import (
        gguf_config,
        iter_gguf_stored_weights,
        iter_gguf_weights,
        open_gguf,
    )
    from plait.runtime.tokenizer import Tokenizer

    reader = open_gguf(path)
    config, generation_config = gguf_config(reader, path)
    tokenizer = None
    if "tokenizer.ggml.tokens" in reader.fields:
        tokenizer = Tokenizer.from_gguf(path)
        # The tokenizer adds the chat format's turn-end token to the file's single EOS; make
        # generation_config agree, since that is where sampling defaults are read from.
        eos = tokenizer.eos_token_ids
        generation_config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return ModelSource(path, config, generation_config, tokenizer, "gguf",
                       weight_reader=lambda skip: iter_gguf_weights(reader, config, path, skip=skip),
                       stored_reader=lambda: iter_gguf_stored_weights(reader, config))


def _resolve_dummy(model_path: str) -> ModelSource:
    from plait.runtime.model_loader.hf_folder import has_tokenizer, read_config, read_generation_config, read_json

    path = os.path.expanduser(model_path)
    if os.path.isfile(path) and path.endswith(".gguf"):  # the GGUF's config and tokenizer, random weights
        real = _resolve_gguf(path)
        return ModelSource(path, real.config, real.generation_config, real.tokenizer, "dummy")
    if os.path.isdir(path):
        folder, raw = path, read_config(path)
    elif os.path.isfile(path):
        folder, raw = os.path.dirname(path), read_json(path)
    else:
        preset = preset_config(model_path)
        if preset is None:
            raise ModelLoadError(
                f"{model_path}: not a folder, a config.json or a dummy preset; presets: {', '.join(PRESETS)}"
            )
        eos = {k: preset[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in preset}
        return ModelSource(model_path, preset, eos, None, "dummy")
    check_architecture(raw, path)
    generation_config = read_generation_config(folder)
    tokenizer = _load_tokenizer(folder, generation_config) if has_tokenizer(folder) else None
    return ModelSource(path, normalize_config(raw, path), generation_config, tokenizer, "dummy")
