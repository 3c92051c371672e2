"""Block weights laid out once at load for the integer products on AVX-512 VNNI (csrc/linear_avx512.cpp).

Three layouts, each a copy beside the stored rows, made where the CPU has VNNI:
- int16 panels of an 8-bit weight (`int16_panel_pack`): the stored codes in the order of the panels
  of 32 output columns, as many bytes as the rows; `kernels.linear(..., packed=)` reads them (the LM
  head, every row of a decode batch).
- int14 weights (`int14_pack`): a block weight rounded to 14-bit codes per row, 2 bytes a weight; the
  products of many rows (prefill).
- 4-bit column panels (`q4_panel_pack`): a 4-bit weight's codes in panels of 16 output columns, as many
  bytes as the stored rows with float constants; the products of decode batches.

Each `*_linear` checks its tensors as `kernels` does and hands their pointers to the kernels.
"""

from __future__ import annotations

import os

import torch

from plait.runtime.cpu import kernels
from plait.runtime.cpu.kernels import WeightFormat, _check, _product_out, _threads, int16_panels_available

INT16_PANEL_PACKS = (WeightFormat.Q8_0, WeightFormat.Q8_0F)
INT14_PACKS = (WeightFormat.Q4_0, WeightFormat.Q4_1, WeightFormat.Q8_0, WeightFormat.Q4_1F, WeightFormat.Q8_0F)
Q4_PANEL_PACKS = (WeightFormat.Q4_0, WeightFormat.Q4_1, WeightFormat.Q4_1F)


def _panel_weight_k(weight: torch.Tensor, fmt: WeightFormat, out_features: int, kind: str) -> int:
    """K of a stored block weight [N, row_bytes] to be packed into panels, checked; the panels need VNNI."""
    _check(weight, "weight", torch.uint8)
    if not int16_panels_available():
        raise RuntimeError(f"{kind} panels need the kernels and a CPU with AVX-512 VNNI")
    k = weight.shape[1] // fmt.block_bytes * 32
    if weight.shape != (out_features, fmt.row_bytes(k)):
        raise ValueError(f"weight {tuple(weight.shape)} does not hold [{out_features}, {k}] in {fmt.name}")
    return k


def _packed_product_args(x: torch.Tensor, packed: torch.Tensor, out_features: int, kind: str, panel_bytes,
                         gate_up: int | None = None) -> tuple[int, int]:
    """(M, K) of a product of x [M, K] with a weight [out_features, K] packed as `panel_bytes(N, K)` bytes
    say (`gate_up`: its intermediate size, for the message), checked; the products need VNNI."""
    _check(x, "x", torch.float32)
    _check(packed, "packed", torch.uint8)
    if not int16_panels_available():
        raise RuntimeError(f"{kind} panels need the kernels and a CPU with AVX-512 VNNI")
    m, k = x.shape
    if k % 32 or packed.numel() != panel_bytes(out_features, k):
        shape = f"[{out_features}, {k}]" if gate_up is None else f"a [2 x {gate_up}, {k}] gate/up weight"
        raise ValueError(f"packed panels of {packed.numel()} bytes are not those of {shape}")
    return m, k


def _pack(weight: torch.Tensor, fmt: WeightFormat, out_features: int, packs: tuple, kind: str, formats: str,
          panel_bytes, pack) -> torch.Tensor:
    """`weight` laid out by the kernels' `pack` into `panel_bytes(N, K)` bytes, for formats `packs`."""
    if fmt not in packs:
        raise ValueError(f"{kind} panels are packed from {formats}, not {fmt.name}")
    k = _panel_weight_k(weight, fmt, out_features, kind)
    packed = torch.empty(panel_bytes(out_features, k), dtype=torch.uint8)
    pack(weight.data_ptr(), int(fmt), out_features, k, packed.data_ptr())
    return packed


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None,
                   out: torch.Tensor | None, kind: str, panel_bytes, linear) -> torch.Tensor:
    """x times a packed weight transposed (+ bias) by the kernels' `linear`, the tensors checked."""
    m, k = _packed_product_args(x, packed, out_features, kind, panel_bytes)
    if bias is not None:
        _check(bias, "bias", torch.float32)
    out = _product_out(out, m, out_features)
    linear(x.data_ptr(), m, k, packed.data_ptr(), out_features, 0 if bias is None else bias.data_ptr(),
           out.data_ptr(), out_features, _threads())
    return out


def _packed_gated(x: torch.Tensor, packed: torch.Tensor, intermediate: int, kind: str, panel_bytes,
                  gated) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) over a packed gate/up weight by the kernels' `gated`, the tensors checked."""
    m, k = _packed_product_args(x, packed, 2 * intermediate, kind, panel_bytes, intermediate)
    out = torch.empty((m, intermediate), dtype=torch.float32)
    gated(x.data_ptr(), m, k, packed.data_ptr(), intermediate, out.data_ptr(), _threads())
    return out


def int16_panel_pack(weight: torch.Tensor, fmt: WeightFormat, out_features: int) -> torch.Tensor:
    """An 8-bit block weight [N, row_bytes] (Q8_0, Q8_0F) laid out once in the int16 panels' order (uint8:
    per 32 output columns the codes of each pair of inputs side by side, then the blocks' d in float32;
    as many bytes as the stored rows, for whole panels), for `kernels.linear(..., packed=)`: products of
    more than 8 rows then widen each panel with one instruction per 16 pairs instead of transposing the
    stored rows' blocks every call, and those of 2 to 48 rows take its columns in the lanes."""
    return _pack(weight, fmt, out_features, INT16_PANEL_PACKS, "int16", "8-bit block formats",
                 kernels._ext.int16_panel_bytes, kernels._ext.int16_panel_pack)


def int14_pack(weight: torch.Tensor, fmt: WeightFormat, out_features: int) -> torch.Tensor:
    """A block weight [N, row_bytes] (INT14_PACKS) rounded once to 14-bit codes per row (one scale per
    output feature: max |w| / 8191, to nearest even) and laid out in the int16 panels' order (uint8: per
    32 output columns the codes of each pair of inputs side by side as int16, then the columns' scales
    in float32; 2 bytes a weight), for `int14_linear`."""
    return _pack(weight, fmt, out_features, INT14_PACKS, "int14", "block formats", kernels._ext.int14_panel_bytes,
                 kernels._ext.int14_panel_pack)


def int14_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 times an `int14_pack`ed weight [N, K] transposed (+ bias): [M, N] float32, with x
    rounded to 14-bit codes per block of 32 and exact integer products of the codes on AVX-512 VNNI."""
    return _packed_linear(x, packed, out_features, bias, out, "int14", kernels._ext.int14_panel_bytes,
                          kernels._ext.int14_linear)


def int14_gated_linear(x: torch.Tensor, packed: torch.Tensor, intermediate: int) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) [M, I] for a gate/up weight [2I, K] (gate rows first) `int14_pack`ed
    whole, I a multiple of 32: what the decoder stack's MLP runs on that packing, without writing the
    [M, 2I] product; the bits of `int14_linear` then `kernels.silu_mul`."""
    if intermediate % 32:
        raise ValueError(f"the gated int14 panels need a gate/up weight whose intermediate size is a multiple "
                         f"of 32, not {intermediate}")
    return _packed_gated(x, packed, intermediate, "int14", kernels._ext.int14_panel_bytes,
                         kernels._ext.int14_gated_linear)


def q4_panels_available() -> bool:
    """Whether decode-sized products of 4-bit weights run on their panels (`q4_panel_linear`): where the
    int16 panels run (AVX-512 VNNI); `PLAIT_DISABLE_CPU_Q4_PANELS=1` turns them off alone (the decode
    kernels then read the stored rows, with the same rounding)."""
    return int16_panels_available() and os.environ.get("PLAIT_DISABLE_CPU_Q4_PANELS", "") in ("", "0")


def q4_panel_pack(weight: torch.Tensor, fmt: WeightFormat, out_features: int) -> torch.Tensor:
    """A 4-bit block weight [N, row_bytes] (Q4_PANEL_PACKS) laid out once in panels of 16 output columns
    (uint8: per panel and block of 32 inputs, the 16 columns' codes as 4 x 16 words of 8 nibbles, each
    word 4 pairs of inputs, then the columns' d and m in float32; 0.75 bytes a weight, as the stored
    rows with float constants), for `q4_panel_linear`."""
    return _pack(weight, fmt, out_features, Q4_PANEL_PACKS, "4-bit", "4-bit block formats",
                 kernels._ext.q4_panel_bytes, kernels._ext.q4_panel_pack)


def q4_panel_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 times a `q4_panel_pack`ed weight [N, K] transposed (+ bias): [M, N] float32, with
    x rounded as the int16 decode products round it (int16 codes per block of 32) and exact integer
    block sums on AVX-512 VNNI: the decode products' arithmetic, for decode-sized M."""
    return _packed_linear(x, packed, out_features, bias, out, "4-bit", kernels._ext.q4_panel_bytes,
                          kernels._ext.q4_panel_linear)


def q4_panel_gated_linear(x: torch.Tensor, packed: torch.Tensor, intermediate: int) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) [M, I] for a gate/up weight [2I, K] (gate rows first) `q4_panel_pack`ed
    whole, I a multiple of 16: the bits of `q4_panel_linear` then `kernels.silu_mul`."""
    if intermediate % 16:
        raise ValueError(f"the gated 4-bit panels need the intermediate size a multiple of 16, not {intermediate}")
    return _packed_gated(x, packed, intermediate, "4-bit", kernels._ext.q4_panel_bytes,
                         kernels._ext.q4_panel_gated_linear)
