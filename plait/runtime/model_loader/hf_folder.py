"""A local Hugging Face checkpoint folder: config.json, safetensors shards, tokenizer files.

Shard headers are checked when the folder is resolved (cheap: only the JSON header is read), so
a truncated download fails at startup with the file's name rather than halfway through loading.
Tensors are then read lazily, one at a time, through `safe_open`'s memory map.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from plait.runtime.model_loader.source import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from e


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    return read_json(path)


def read_generation_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "generation_config.json")
    return read_json(path) if os.path.isfile(path) else {}


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def list_shards(folder: str) -> dict[str, list[str]]:
    """`{shard_path: [tensor names]}` for the folder's safetensors, every header validated."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map: dict[str, str] = read_json(index_path).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        weight_map = {}
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        others = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
        hint = f" (found {', '.join(others)}; only safetensors are read from a folder)" if others else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weight files{hint}")

    shards: dict[str, list[str]] = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ModelLoadError(f"{path}: shard listed in {INDEX_FILE} is missing")
        try:
            with safe_open(path, framework="pt") as f:
                shards[path] = list(f.keys())
        except Exception as e:  # SafetensorError, OSError: a truncated or corrupt file
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors file: {e}") from e
    for tensor, name in weight_map.items():
        if tensor not in shards[os.path.join(folder, name)]:
            raise ModelLoadError(f"{os.path.join(folder, name)}: {INDEX_FILE} lists {tensor!r} but the shard lacks it")
    return shards


def _is_buffer(name: str) -> bool:
    # Old checkpoints saved the rotary inverse frequencies; they are recomputed, not parameters.
    return name.endswith("rotary_emb.inv_freq")


def iter_safetensors(shards: dict[str, list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` in the file's dtype, one tensor in memory at a time."""
    total = sum(len(names) for names in shards.values())
    with tqdm(total=total, desc="Loading safetensors", unit="tensor", file=sys.stderr) as bar:
        for path, names in shards.items():
            try:
                with safe_open(path, framework="pt") as f:
                    for name in names:
                        bar.update(1)
                        if not _is_buffer(name):
                            yield name, f.get_tensor(name)
            except ModelLoadError:
                raise
            except Exception as e:
                raise ModelLoadError(f"{path}: cannot read tensors: {e}") from e
