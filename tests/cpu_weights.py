"""Stored weights for the CPU kernels' tests: GGUF blocks made with the `gguf` package (whose dequantizer
is the reference) and the kernels' float-constant layouts of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from plait.runtime.cpu import kernels
from plait.runtime.cpu.kernels import WeightFormat

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built or no AVX2 here")

BLOCK_TYPES = {WeightFormat.Q8_0: QT.Q8_0, WeightFormat.Q4_0: QT.Q4_0, WeightFormat.Q4_1: QT.Q4_1}
FLOAT_CONSTANTS = {WeightFormat.Q8_0F: WeightFormat.Q8_0, WeightFormat.Q4_1F: WeightFormat.Q4_1}  # -> GGUF format


def gguf_weight(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored bytes [N, row_bytes], the reference float32 weight the file means)."""
    raw = quantize(w.numpy(), BLOCK_TYPES[fmt])
    ref = torch.from_numpy(dequantize(raw, BLOCK_TYPES[fmt]).astype(np.float32)).reshape(w.shape)
    return torch.from_numpy(np.ascontiguousarray(raw)).view(torch.uint8), ref


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def float_constant_weight(fmt: WeightFormat, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random Q4_1F / Q8_0F weight as the kernels store it: (rows, the float32 weight)."""
    torch.manual_seed(seed)
    data, ref = gguf_weight(torch.randn(n, k), FLOAT_CONSTANTS[fmt])
    got, stored = kernels.float_constants(FLOAT_CONSTANTS[fmt], data.view(n, -1))
    assert got == fmt
    return stored, ref
