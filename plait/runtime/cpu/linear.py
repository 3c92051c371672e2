"""Linear layers and embeddings whose weights stay in their stored format on the CPU.

A decode step on a CPU is bound by reading the weights, so the kernels read them as the checkpoint
stores them: a GGUF's Q4_0/Q4_1/Q8_0 blocks (4.5 to 8.5 bits a weight), or 16-bit floats, decoded
in registers and multiplied in float32. `StoredWeight` is such a matrix; `CpuLinear` and
`CpuEmbedding` use one in place of `nn.Linear` / `nn.Embedding` (a tied LM head shares its
embedding's `StoredWeight`, as the checkpoint does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plait.runtime.cpu import kernels, panels
from plait.runtime.cpu.kernels import WeightFormat


# Products of at least this many rows take a layer's AMX weight when it has one (below, the decode
# kernels read the stored weight: fewer bytes). Mirrors kAmxMinRows in csrc/stack_avx2.cpp.
AMX_MIN_ROWS = 9
# Products of this many rows take a layer's AMX int8 packing when it has one (`pack_amx_int8`).
AMX_INT8_ROWS = (4, 64)
# Products of more than this many rows take a layer's int14 packing when it has one (`pack_int14`); up
# to it the decode kernels read the stored weight. Mirrors kSmallStepRows in csrc/stack_avx2.cpp.
DECODE_ROWS = 8
# Products of up to this many rows take a layer's 4-bit panels when it has them (`pack_q4_panels`) and
# no AMX weight (up to DECODE_ROWS with one): from memory they beat the int14 weights' 2 bytes a weight
# up to 48-64 rows. Mirrors kQ4MaxRows in csrc/stack_avx2.cpp.
Q4_PANEL_MAX_ROWS = 48


@dataclass
class StoredWeight:
    """A weight matrix [out_features, in_features] in format `fmt`.

    `data` is uint8 [out_features, row_bytes] for block formats, else the float tensor itself."""

    data: torch.Tensor
    fmt: WeightFormat
    out_features: int
    in_features: int
    # Block formats: how decode-sized products multiply: "float", or x rounded to "int16" / "int8" and
    # integer products (kernels.DECODE_DOTS).
    decode_dot: str = "float"
    # Block formats: how products of more than 8 rows multiply: "float" (float32 panels), or "int16"
    # (x rounded as the int16 decode products; AVX-512 VNNI)
    panel_dot: str = "float"

    @property
    def kernel_format(self) -> int:
        """The format code products with this weight pass to the kernels."""
        return kernels.kernel_format(self.fmt, self.decode_dot, self.panel_dot)

    def __post_init__(self) -> None:
        assert self.data.is_contiguous() and self.in_features % 32 == 0
        nbytes = self.data.numel() * self.data.element_size()
        assert nbytes == self.out_features * self.fmt.row_bytes(self.in_features), "weight bytes do not match its shape"

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @classmethod
    def from_float(cls, weight: torch.Tensor, store_dtype: torch.dtype | None = None) -> "StoredWeight":
        """A float weight stored in `store_dtype` (rounded: `--dtype bfloat16/float16`), or with None
        in 16 bits when that loses nothing (a bf16 or fp16 checkpoint loaded into float32), else as it is."""
        weight = weight.detach().contiguous()
        if store_dtype is not None:
            weight = weight.to(store_dtype).contiguous()
        elif weight.dtype == torch.float32:
            for half in (torch.bfloat16, torch.float16):
                candidate = weight.to(half)
                if torch.equal(candidate.float(), weight):
                    weight = candidate
                    break
        return cls(weight, kernels.float_format(weight.dtype), weight.shape[0], weight.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out_features, in_features] (tests, fallbacks)."""
        ids = torch.arange(self.out_features, dtype=torch.int64)
        return kernels.embedding(ids, self.data, self.fmt, self.in_features)


def gather_stored(model: nn.Module) -> int:
    """Move the bytes of every `StoredWeight` of `model`'s CPU layers into one buffer (each weight a view
    of it, on a 64-byte line) and return its size. Separately, most weights of a small model are under
    2 MiB, and PyTorch puts only allocations of 2 MiB or more on huge pages (`plait.runtime.huge_pages`);
    together they are one allocation on huge pages, which a decode step streams through with a fraction
    of the TLB misses. Call before anything records the weights' addresses (the decoder stack)."""
    layers = [m for m in model.modules() if isinstance(m, (CpuLinear, CpuEmbedding))]
    # one copy of each tensor: weights that share their bytes (a tied embedding and LM head) share one view
    tensors = list({t.data_ptr(): t for t in (m.stored.data for m in layers)}.values())
    if not tensors:
        return 0
    spans = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors]
    arena = torch.empty(sum(spans) + 64, dtype=torch.uint8)
    offset = (-arena.data_ptr()) % 64
    views = {}
    for t, span in zip(tensors, spans):
        view = arena[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        views[t.data_ptr()] = view.copy_(t)
        offset += span
    new = [views[m.stored.data.data_ptr()] for m in layers]  # before any StoredWeight (some are shared) moves
    for layer, view in zip(layers, new):  # the StoredWeight, and the module's buffer that held the old bytes
        layer.stored.data = view
        layer.packed = view
    return arena.numel()


class CpuLinear(nn.Module):
    """y = x W^T + b with W a `StoredWeight`; x and y float32."""

    def __init__(self, weight: StoredWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.stored = weight
        self.register_buffer("packed", weight.data, persistent=False)  # counted by memory reports
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
        self.in_features, self.out_features = weight.in_features, weight.out_features
        # The weight packed for AMX (`pack_amx`): products of more than `AMX_MIN_ROWS` rows run on it.
        self.amx: torch.Tensor | None = None
        # The 4-bit codes repacked for AMX's int8 tiles (`pack_amx_int8`): decode-sized products.
        self.amx_int8: torch.Tensor | None = None
        # An 8-bit weight laid out in the int16 panels' order (`pack_int16_panels`): products of more than
        # 8 rows on the int16 panels read it instead of transposing the stored rows' blocks each call.
        self.int16_panels: torch.Tensor | None = None
        # The weight rounded to 14 bits per row in the panels' order (`pack_int14`): products of more
        # than `DECODE_ROWS` rows run on it.
        self.int14: torch.Tensor | None = None
        # A 4-bit weight's codes laid out in panels of 16 output columns (`pack_q4_panels`): products of up
        # to `Q4_PANEL_MAX_ROWS` rows run on it (`DECODE_ROWS` with an AMX weight), instead of the decode
        # kernels over the stored rows and the int14 packing.
        self.q4_panels: torch.Tensor | None = None

    def pack_int14(self) -> bool:
        """Round a block weight to 14-bit codes per row and lay it out for the int14 products
        (panels.int14_pack: 2 bytes a weight), beside the stored one; False for other formats."""
        if self.stored.fmt not in panels.INT14_PACKS:
            return False
        self.int14 = panels.int14_pack(self.stored.data, self.stored.fmt, self.out_features)
        return True

    def pack_q4_panels(self) -> bool:
        """Lay a 4-bit block weight out in panels of 16 output columns (panels.q4_panel_pack: 0.75 bytes
        a weight), beside the stored one, for the decode-sized products; False for other formats."""
        if self.stored.fmt not in panels.Q4_PANEL_PACKS:
            return False
        self.q4_panels = panels.q4_panel_pack(self.stored.data, self.stored.fmt, self.out_features)
        return True

    def pack_amx_int8(self) -> bool:
        """Repack a Q4_1 or Q8_0 weight for the AMX int8 products (kernels.amx_int8_pack: 0.75 or 1.25
        bytes a weight), beside the stored one; False for other formats."""
        if self.stored.fmt not in kernels.AMX_INT8_PACK_BYTES:
            return False
        self.amx_int8 = kernels.amx_int8_pack(self.stored.data, self.stored.fmt, self.out_features, self.in_features)
        return True

    def pack_int16_panels(self) -> bool:
        """Lay a Q8_0 / Q8_0F weight out in the int16 panels' order (panels.int16_panel_pack: as many
        bytes as the stored rows), beside the stored one; False for other formats."""
        if self.stored.fmt not in panels.INT16_PANEL_PACKS:
            return False
        self.int16_panels = panels.int16_panel_pack(self.stored.data, self.stored.fmt, self.out_features)
        return True

    def pack_amx(self, exact: bool = True) -> None:
        """Pack the weight for the AMX products (kernels.amx_pack), beside the stored one: 4 bytes a
        weight with its lo parts (`exact`, products near float32), 2 without (bfloat16 products)."""
        self.amx = kernels.amx_pack(self.stored.dequantize(), exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        flat = x.reshape(-1, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if self.amx_int8 is not None and AMX_INT8_ROWS[0] <= flat.shape[0] <= AMX_INT8_ROWS[1]:
            return kernels.amx_int8_linear(flat, self.amx_int8, self.out_features, self.bias).view(
                *x.shape[:-1], self.out_features)
        if self.q4_panels is not None and flat.shape[0] <= (DECODE_ROWS if self.amx is not None else Q4_PANEL_MAX_ROWS):
            return panels.q4_panel_linear(flat, self.q4_panels, self.out_features, self.bias).view(
                *x.shape[:-1], self.out_features)
        if self.int14 is not None and flat.shape[0] > DECODE_ROWS:
            return panels.int14_linear(flat, self.int14, self.out_features, self.bias).view(
                *x.shape[:-1], self.out_features)
        if self.amx is not None and flat.shape[0] >= AMX_MIN_ROWS:
            return kernels.amx_linear(flat, self.amx, self.out_features, self.bias).view(*x.shape[:-1], self.out_features)
        out = kernels.linear(flat, self.stored.data, self.stored.fmt, self.out_features, bias=self.bias,
                             dot=self.stored.decode_dot, panels=self.stored.panel_dot, packed=self.int16_panels)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.stored.fmt.name}"


class CpuEmbedding(nn.Module):
    def __init__(self, weight: StoredWeight):
        super().__init__()
        self.stored = weight
        self.register_buffer("packed", weight.data, persistent=False)
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [n] int64 -> [n, embedding_dim] float32
        return kernels.embedding(ids.contiguous(), self.stored.data, self.stored.fmt, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.stored.fmt.name}"
