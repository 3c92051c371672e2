"""Puts a model's linear layers and embedding on the CPU kernels (`CpuLinear`, `CpuEmbedding`).

Two stages, so that a checkpoint's compact weights are never expanded:
1. `attach_stored(model, stored)` before the weights are loaded: every layer whose checkpoint
   tensors exist in a stored format the kernels read (a GGUF's blocks, see
   `ModelSource.iter_stored_weights`) takes them as they are. It returns the checkpoint names it
   consumed, which the float loader then skips (no dequantization, no float copy).
2. `convert_remaining(model)` after loading: the layers still holding float weights keep them, in
   16 bits when that is lossless (a bf16 checkpoint loaded into float32), read by the same kernels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from plait.runtime.cpu import kernels
from plait.runtime.cpu.kernels import WeightFormat
from plait.runtime.cpu.layers import CpuRMSNorm, CpuRotaryEmbedding, CpuSiluAndMul
from plait.runtime.cpu.linear import CpuEmbedding, CpuLinear, StoredWeight
from plait.runtime.layers.activation import SiluAndMul
from plait.runtime.layers.norm import RMSNorm
from plait.runtime.layers.rotary import RotaryEmbedding

# Layers whose kernel forms add no state: switched by class.
_KERNEL_CLASSES = {RMSNorm: CpuRMSNorm, SiluAndMul: CpuSiluAndMul, RotaryEmbedding: CpuRotaryEmbedding}


class CpuWeightsSummary(NamedTuple):
    """What the kernels read, for the load log and /get_server_info."""

    formats: dict[str, int]  # format name -> number of matrices
    nbytes: int  # bytes of all stored matrices

    def describe(self) -> str:
        parts = ", ".join(f"{n} {fmt}" for fmt, n in sorted(self.formats.items()))
        return f"{parts} ({self.nbytes / 2**20:.0f} MiB)"


def attach_stored(model: nn.Module, stored: Iterable[tuple[str, str, torch.Tensor]]) -> frozenset[str]:
    """Replace the layers whose every checkpoint piece is in `stored` (same format, contiguous rows).

    `stored` yields `(checkpoint name, format name, tensor)`; the model maps checkpoint names to its
    fused modules with `checkpoint_rows`. Under tensor parallelism each tensor is first cut to this
    rank's part (`checkpoint_split`): rows as they are, columns as whole 32-value blocks; a part that
    is not whole blocks is left to the float loader. Returns the checkpoint names now in use."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    pieces: dict[str, list[tuple[int, str, str, torch.Tensor]]] = {}
    embedding: tuple[str, StoredWeight] | None = None
    for ckpt_name, fmt_name, tensor in stored:
        placed = model.checkpoint_rows(ckpt_name)
        if placed is None:
            continue
        module_name, first_row = placed
        split = model.checkpoint_split(ckpt_name) if hasattr(model, "checkpoint_split") else None
        if split is not None:
            tensor = _narrow_stored(WeightFormat[fmt_name], tensor, *split)
            if tensor is None:
                continue
        if module_name in linears:
            pieces.setdefault(module_name, []).append((first_row, ckpt_name, fmt_name, tensor))
        elif module_name == model.embedding_module_name:
            embedding = (ckpt_name, _stored(fmt_name, tensor))
    consumed: set[str] = set()
    for module_name, parts in pieces.items():
        linear = linears[module_name]
        parts.sort(key=lambda p: p[0])
        rows, fmts = 0, {p[2] for p in parts}
        for first_row, _, _, tensor in parts:
            if first_row != rows:
                break
            rows += tensor.shape[0]
        if len(fmts) != 1 or rows != linear.out_features or linear.bias is not None:
            continue  # incomplete, mixed formats, or a bias (loaded with the float weights instead)
        data = torch.cat([p[3] for p in parts]) if len(parts) > 1 else parts[0][3]
        weight = _stored(fmts.pop(), data)
        if weight.in_features != linear.in_features:
            continue
        _replace(model, module_name, CpuLinear(weight))
        consumed.update(p[1] for p in parts)
    if embedding is not None:
        ckpt_name, weight = embedding
        _replace(model, model.embedding_module_name, CpuEmbedding(weight))
        consumed.add(ckpt_name)
    return frozenset(consumed)


def convert_remaining(model: nn.Module, store_dtype: torch.dtype | None = None) -> CpuWeightsSummary:
    """Every `nn.Linear` / `nn.Embedding` left becomes a kernel layer over its float weight (stored in
    `store_dtype` when given, see `StoredWeight.from_float`), the norms,
    activation and rotary embedding their kernel forms; the tied LM head reads the embedding's
    stored weight. Returns what the kernels read."""
    for name, module in list(model.named_modules()):
        if type(module) in _KERNEL_CLASSES:
            if isinstance(module, RotaryEmbedding) and module.head_dim % 16:
                continue  # the kernel rotates 8-float halves; others keep the reference rotation
            module.__class__ = _KERNEL_CLASSES[type(module)]
        elif isinstance(module, nn.Linear) and module.in_features % 32 == 0:  # the kernels' rows are whole blocks
            bias = module.bias.detach() if module.bias is not None else None
            _replace(model, name, CpuLinear(StoredWeight.from_float(module.weight, store_dtype), bias))
        elif isinstance(module, nn.Embedding):
            _replace(model, name, CpuEmbedding(StoredWeight.from_float(module.weight, store_dtype)))
    model.use_logits_head(_logits_head(model))
    formats: dict[str, int] = {}
    nbytes = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (CpuLinear, CpuEmbedding)) and id(module.stored) not in seen:
            seen.add(id(module.stored))
            formats[module.stored.fmt.name] = formats.get(module.stored.fmt.name, 0) + 1
            nbytes += module.stored.nbytes
    return CpuWeightsSummary(formats, nbytes)


def _logits_head(model: nn.Module) -> CpuLinear:
    if model.arch.tie_word_embeddings:
        return CpuLinear(model.get_submodule(model.embedding_module_name).stored)
    head = model.lm_head
    assert isinstance(head, CpuLinear)
    return head


def _narrow_stored(fmt: WeightFormat, tensor: torch.Tensor, dim: int, span) -> torch.Tensor | None:
    """`tensor`'s rows or columns `span` (a copy, so a rank keeps only its part), or None when columns
    of a block format do not fall on block boundaries."""
    if dim == 0:
        return tensor.narrow(0, span.start, span.count).clone()
    if fmt.block_bytes is None:
        return tensor.narrow(1, span.start, span.count).contiguous()
    if span.start % 32 or span.count % 32:
        return None
    return tensor.narrow(1, span.start // 32 * fmt.block_bytes, span.count // 32 * fmt.block_bytes).contiguous()


def _stored(fmt_name: str, tensor: torch.Tensor) -> StoredWeight:
    fmt = WeightFormat[fmt_name]
    out_features = tensor.shape[0]
    if fmt.block_bytes is not None:
        in_features = tensor.shape[1] // fmt.block_bytes * 32
    else:
        in_features = tensor.shape[1]
    if kernels.available():  # the kernels read float32 block constants faster (the same values)
        fmt, tensor = kernels.float_constants(fmt, tensor)
    return StoredWeight(tensor.contiguous(), fmt, out_features, in_features)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
