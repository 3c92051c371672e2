"""Small-batch CPU products straight from a GGUF file's 4-bit weights.

A decode step on the CPU is bound by reading the weights: at a few rows, PyTorch's bf16 product streams
them at about a quarter of the memory bandwidth (docs/benchmarks.md). When the checkpoint is a GGUF of
Q4_0/Q4_1 blocks, those blocks map exactly onto PyTorch's packed int4 format (`w = (code - 8) * scale +
zero` per group of 32 inputs), so `Int4Linear` keeps them packed beside the dequantized weight and uses
`_weight_int4pack_mm_for_cpu` for inputs of up to `max_rows` rows (decode batches), a quarter of the
bytes; larger inputs (prefill, big batches), where the packed kernel is slower, use the bf16 weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZE = 32
# Rows up to which the packed product is faster than the bf16 one (default model's shapes, 2-core
# AVX-512 BF16 machine: 30 layers' products at 8 rows 11.6 against ~20 ms, equal near 20 rows).
MAX_ROWS = 16


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


class Int4Linear(nn.Module):
    """`linear` (whose weight stays, for large inputs) plus the packed 4-bit form of the same weight."""

    def __init__(self, linear: nn.Linear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *,
                 max_rows: int = MAX_ROWS):
        super().__init__()
        out_features, in_features = linear.weight.shape
        assert codes.shape == (out_features, in_features) and in_features % GROUP_SIZE == 0
        self.weight = linear.weight
        self.bias = linear.bias
        self.max_rows = max_rows
        dtype = linear.weight.dtype
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1), persistent=False
        )
        # [in / 32, out, 2]: each group's scale and zero, in the activations' dtype.
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= self.max_rows and x.dtype == self.scales_zeros.dtype:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_zeros)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


def attach_int4(
    model: nn.Module, q4_weights: Iterable[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]], *,
    max_rows: int = MAX_ROWS,
) -> int:
    """Replace each `nn.Linear` of `model` whose every output row has 4-bit codes in `q4_weights`
    (checkpoint names, placed through the model's `checkpoint_rows`) by an `Int4Linear`. Returns how many."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    parts: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for ckpt_name, codes, scale, zero in q4_weights:
        placed = model.checkpoint_rows(ckpt_name)
        if placed is None:
            continue
        module_name, start = placed
        if module_name in linears:
            parts.setdefault(module_name, []).append((start, codes, scale, zero))
    replaced = 0
    for module_name, pieces in parts.items():
        linear = linears[module_name]
        pieces.sort(key=lambda p: p[0])
        rows = 0
        for start, codes, _, _ in pieces:  # contiguous and complete, or left as it is
            if start != rows:
                break
            rows += codes.shape[0]
        if rows != linear.weight.shape[0] or pieces[0][1].shape[1] != linear.weight.shape[1]:
            continue
        codes, scale, zero = (torch.cat([p[i] for p in pieces]) for i in (1, 2, 3))
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int4Linear(linear, codes, scale, zero, max_rows=max_rows))
        replaced += 1
    return replaced
