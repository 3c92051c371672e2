"""Command-line flags generated from the configuration dataclasses (one source of truth).

A field `max_total_tokens` becomes `--max-total-tokens`; booleans become store-true switches;
fields whose values come from a registry get `choices` from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from plait.runtime.config import RuntimeConfig


def _choices() -> dict[str, list[str]]:
    # Names only (plait.runtime.choices): the registries themselves import torch.
    from plait.runtime import choices
    from plait.runtime.constrained.base import GRAMMAR_BACKENDS

    return {
        "schedule_policy": list(choices.SCHEDULE_POLICIES),
        "prefix_cache": list(choices.PREFIX_CACHES),
        "attention_backend": list(choices.ATTENTION_BACKENDS),
        "grammar_backend": list(GRAMMAR_BACKENDS),
        "dtype": ["auto", "bfloat16", "float16", "float32"],
        "kv_cache_dtype": ["auto", "float32", "bfloat16", "float16", "int8", "fp8_e5m2", "fp8_e4m3"],
        "load_format": ["auto", "safetensors", "gguf", "dummy"],
        "hicache_write_policy": list(choices.WRITE_POLICIES),
        "hicache_storage_backend": list(choices.STORAGE_BACKENDS),
        "radix_eviction_policy": list(choices.EVICTION_POLICIES),
    }


def _base_type(annotation: Any) -> type:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.split("|") if p.strip() != "None"]
        return hints.get(parts[0], str)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or args:
        return args[0]
    return annotation


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    choices = _choices()
    for section, cls in RuntimeConfig.sections().items():
        add_section_args(parser, section, cls, choices=choices)


def add_section_args(
    parser: argparse.ArgumentParser, title: str, cls: type, *, choices: dict[str, list[str]] | None = None
) -> None:
    """One flag per field of the config dataclass `cls`, in an argument group named `title`."""
    choices = choices or {}
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(f.type)
        text = f.metadata.get("help", "")
        if isinstance(f.type, str) and f.type.startswith("tuple["):  # a list of values: --flag A B C
            group.add_argument(flag, nargs="*", default=list(f.default), dest=f.name, help=text)
            continue
        if kind is bool:
            group.add_argument(flag, action="store_true", default=f.default, dest=f.name, help=text)
            continue
        # A None default's meaning is spelled out in the help text itself ("default: the model's ...").
        if f.default is not None and "default:" not in text:
            text += f" (default: {f.default})"
        group.add_argument(flag, type=kind, default=f.default, dest=f.name, choices=choices.get(f.name), help=text)


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags that belong to the runtime configuration, as Engine options."""
    names = {f.name for cls in RuntimeConfig.sections().values() for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}
