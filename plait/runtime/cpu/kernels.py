"""Typed entry points to Plait's CPU kernels (`csrc/`, built by `pip install` as `_kernels`).

The kernels take raw data pointers; every function here checks the tensors it hands over (device,
dtype, contiguity, shapes), so a wrong call is a Python exception, never a bad memory access. They
compute in float32 and run on the OpenMP threads PyTorch uses (`torch.set_num_threads`).

`available()` says whether the kernels can run on this machine (built, and the CPU has AVX2, FMA
and F16C); `PLAIT_DISABLE_CPU_KERNELS=1` turns them off for comparison runs.
"""

from __future__ import annotations

import enum
import os

import torch

try:  # imported after torch: the kernels then share PyTorch's OpenMP runtime (one thread pool)
    from plait.runtime.cpu import _kernels as _ext
except ImportError:  # not built on this platform
    _ext = None


class WeightFormat(enum.IntEnum):
    """How a weight matrix [N, K] is stored (the block formats are GGUF's, 32 values a block)."""

    F32 = 0
    BF16 = 1
    F16 = 2
    Q8_0 = 3
    Q4_0 = 4
    Q4_1 = 5
    # Q8_0 / Q4_1 with each block's constants as float32 (`float_constants`): the same values and
    # products, without two float16 conversions per block in the batch-1 products.
    Q8_0F = 6
    Q4_1F = 7

    @property
    def block_bytes(self) -> int | None:
        """Bytes per block of 32 values (block formats), None for the float formats."""
        return {WeightFormat.Q8_0: 34, WeightFormat.Q4_0: 18, WeightFormat.Q4_1: 20,
                WeightFormat.Q8_0F: 36, WeightFormat.Q4_1F: 24}.get(self)

    def row_bytes(self, k: int) -> int:
        if self.block_bytes is not None:
            return k // 32 * self.block_bytes
        return k * {WeightFormat.F32: 4, WeightFormat.BF16: 2, WeightFormat.F16: 2}[self]


_FLOAT_FORMATS = {torch.float32: WeightFormat.F32, torch.bfloat16: WeightFormat.BF16, torch.float16: WeightFormat.F16}
CACHE_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}


def _cache_row(d: int, dtype: torch.dtype) -> int:
    """Elements of a pool row: D values, or for int8 D codes and a float32 scale (csrc/kernels.h)."""
    return d + 4 if dtype == torch.int8 else d


# GGUF block formats -> (the same with float32 constants, count of float16 constants opening a block)
_FLOAT_CONSTANTS = {WeightFormat.Q8_0: (WeightFormat.Q8_0F, 1), WeightFormat.Q4_1: (WeightFormat.Q4_1F, 2)}


def float_constants(fmt: WeightFormat, data: torch.Tensor) -> tuple[WeightFormat, torch.Tensor]:
    """Rows of a Q8_0 or Q4_1 weight (uint8 [N, row_bytes]) rewritten with each block's float16
    constants as float32 (exact), codes unchanged: (Q8_0F or Q4_1F, the new rows). Other formats
    come back as they are."""
    if fmt not in _FLOAT_CONSTANTS:
        return fmt, data
    new_fmt, consts = _FLOAT_CONSTANTS[fmt]
    n = data.shape[0]
    blocks = data.contiguous().view(n, -1, fmt.block_bytes)  # [N, blocks, bytes]
    head = blocks[:, :, : 2 * consts].contiguous().view(torch.float16).float()  # [N, blocks, consts]
    out = torch.empty((n, blocks.shape[1], new_fmt.block_bytes), dtype=torch.uint8)
    out[:, :, : 4 * consts] = head.view(torch.uint8)
    out[:, :, 4 * consts :] = blocks[:, :, 2 * consts :]
    return new_fmt, out.view(n, -1)


def stack_profile(enable: bool) -> tuple[int, dict[str, float]]:
    """Where the native stack's steps spent their time since the last call: (steps, seconds per
    phase: norm, qkv, rope_store, attention, o, gate_up, silu_mul, down, summed over layers and
    steps), then reset; `enable` turns the clock on (a clock read per phase and layer) or off."""
    if _ext is None:
        return 0, {}
    return _ext.stack_profile(bool(enable))


def isa() -> str:
    """The instruction set the kernels use here ("avx2"), or "none"."""
    return _ext.isa() if _ext is not None else "none"


def avx512_products(on: bool | None = None) -> bool:
    """Whether products of more than 8 rows (prefill, larger decode batches) run on AVX-512 here rather
    than AVX2: a CPU with AVX-512 F/BW/DQ/VL, and `PLAIT_DISABLE_CPU_AVX512=1` not set. With `on`, turns
    them on (only where the CPU has them) or off for the process and returns the previous setting."""
    if _ext is None:
        return False
    return bool(_ext.avx512() if on is None else _ext.avx512(bool(on)))


def amx_available() -> bool:
    """Whether the AMX products can run here (the kernels built, a CPU with AMX-BF16 and AVX-512 BF16,
    and the OS granting the tile state: the first call asks for it); `PLAIT_DISABLE_CPU_AMX=1` turns
    them off."""
    return (available() and bool(_ext.amx())
            and os.environ.get("PLAIT_DISABLE_CPU_AMX", "") in ("", "0"))


def available() -> bool:
    return _ext is not None and _ext.isa() != "none" and os.environ.get("PLAIT_DISABLE_CPU_KERNELS", "") in ("", "0")


def float_format(dtype: torch.dtype) -> WeightFormat:
    return _FLOAT_FORMATS[dtype]


def _check(t: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU tensor")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


def _threads() -> int:
    return torch.get_num_threads()


# Added to a block format's code: decode-sized products with x rounded per 32 values to int8 or int16
# and multiplied in integers (kernels.h).
DECODE_DOTS = {"float": 0, "int8": 0x100, "int16": 0x200}
# Added to a block format's code: products of more than 8 rows round x to int16 per 32 values as well
# and multiply in integers, where the CPU has AVX-512 VNNI (elsewhere they run on float32 panels).
INT16_PANELS = 0x400


def _product_out(out: torch.Tensor | None, m: int, n: int) -> torch.Tensor:
    """A product's output: `out` checked ([m, n] float32), or a new tensor."""
    if out is None:
        return torch.empty((m, n), dtype=torch.float32)
    _check(out, "out", torch.float32)
    assert out.shape == (m, n)
    return out


def kernel_format(fmt: WeightFormat, dot: str = "float", panels: str = "float") -> int:
    """The format code the kernels take: `fmt`, plus for a block format the flags of `dot`, how its
    decode-sized products multiply ("float", "int16" or "int8"), and of `panels`, how products of more
    rows do ("float", or "int16" where the CPU has AVX-512 VNNI); other formats always use float."""
    if dot not in DECODE_DOTS:
        raise ValueError(f"unknown decode product {dot!r}; choose from {', '.join(DECODE_DOTS)}")
    if panels not in ("float", "int16"):
        raise ValueError(f"unknown panel product {panels!r}; choose from float, int16")
    if fmt.block_bytes is None:
        return int(fmt)
    return int(fmt) | DECODE_DOTS[dot] | (INT16_PANELS if panels == "int16" else 0)


def int16_panels_available() -> bool:
    """Whether products of more than 8 rows can run with int16 x here (INT16_PANELS): the kernels built,
    a CPU with AVX-512 VNNI, and the AVX-512 kernels on (`PLAIT_DISABLE_CPU_AVX512` not set)."""
    return available() and bool(_ext.vnni())


def int16_attention_available(head_dim: int) -> bool:
    """Whether attention tasks of many query rows can run on integer codes here (`attention`'s
    arith="int16"): VNNI as for the int16 panels, and a head size that is a multiple of 32 up to 128
    (128 products of 13-bit codes fill an int32 sum)."""
    return int16_panels_available() and head_dim % 32 == 0 and head_dim <= 128


# How attention tasks of many query rows compute: `attention`'s arith -> csrc/kernels.h AttentionMode
ATTENTION_ARITH = {"float": 0, "amx": 1, "amx-bf16": 2, "int16": 3}

def linear(x: torch.Tensor, weight: torch.Tensor, fmt: WeightFormat, out_features: int,
           bias: torch.Tensor | None = None, out: torch.Tensor | None = None, *, dot: str = "float",
           panels: str = "float", packed: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 times the stored weight [N, K] transposed (+ bias): [M, N] float32.

    `weight` holds the rows in format `fmt`: uint8 [N, row_bytes] for block formats, the float
    tensor [N, K] itself otherwise. `out`, if given, is a [M, N] float32 tensor to write into.
    `dot`: for a block format, "int16" / "int8" round x to that type per 32 values in products of up
    to 8 rows and multiply in integers (faster; no longer exactly the float32 product); `panels`
    "int16" does the same in products of more rows where int16_panels_available(), and then `packed`
    (int16_panel_pack of this weight), if given, holds their panels ready: the same bits."""
    _check(x, "x", torch.float32)
    _check(weight, "weight")
    m, k = x.shape
    if k % 32 or weight.numel() * weight.element_size() != out_features * fmt.row_bytes(k):
        raise ValueError(f"weight of {weight.numel() * weight.element_size()} bytes does not hold "
                         f"[{out_features}, {k}] in {fmt.name}")
    if bias is not None:
        _check(bias, "bias", torch.float32)
    out = _product_out(out, m, out_features)
    code = kernel_format(fmt, dot, panels)
    if packed is not None:
        _check(packed, "packed", torch.uint8)
        if packed.numel() != _ext.int16_panel_bytes(out_features, k):
            raise ValueError(f"packed panels of {packed.numel()} bytes are not those of [{out_features}, {k}]")
        _ext.linear_packed(x.data_ptr(), m, k, weight.data_ptr(), packed.data_ptr(), code, out_features,
                           0 if bias is None else bias.data_ptr(), out.data_ptr(), out_features, _threads())
        return out
    _ext.linear(x.data_ptr(), m, k, weight.data_ptr(), code, out_features,
                0 if bias is None else bias.data_ptr(), out.data_ptr(), out_features, _threads())
    return out


AMX_COLS = 32  # output columns per packed block of an AMX weight (csrc/linear_amx.cpp)


def amx_pack(weight: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """A float weight [N, K] (K a multiple of 32) packed for `amx_linear`: its bfloat16 parts hi =
    bf16(w) and, when `exact`, lo = bf16(w - hi); per 32 output columns (N padded with zero rows) and
    32 inputs the tiles [hi, lo] x [columns 0-15, 16-31], each 16 input pairs x 16 columns x 2, as int16."""
    n, k = weight.shape
    if k % 32:
        raise ValueError("AMX weights need K a multiple of 32")
    w = weight.detach().float()
    n_pad = -(-n // AMX_COLS) * AMX_COLS
    if n_pad != n:
        w = torch.cat([w, w.new_zeros((n_pad - n, k))])
    hi = w.bfloat16()
    parts = [hi, (w - hi.float()).bfloat16()] if exact else [hi]
    # each [blocks, half, column, steps, pair, 2] -> [blocks, steps, half, pair, column, 2]
    tiles = [p.view(torch.int16).reshape(n_pad // AMX_COLS, 2, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5)
             for p in parts]
    return torch.stack(tiles, dim=2).contiguous()  # [blocks, steps, part, half, pair, column, 2]


AMX_INT8_GROUP = 16  # output columns per group of an amx_int8_pack
# bytes per group and block of 32 inputs: the codes, then 16 d and 16 m as float32
AMX_INT8_PACK_BYTES = {WeightFormat.Q4_1F: 384, WeightFormat.Q8_0F: 640}


def amx_int8_available() -> bool:
    """Whether AMX's int8 tile products run here too (`amx_int8_linear`); `PLAIT_DISABLE_CPU_AMX_INT8=1`
    turns them off alone (decode-sized batches then take the vector decode kernels or the bfloat16 tiles)."""
    return (amx_available() and bool(_ext.amx_int8())
            and os.environ.get("PLAIT_DISABLE_CPU_AMX_INT8", "") in ("", "0"))


def amx_int8_pack(stored_data: torch.Tensor, fmt: WeightFormat, out_features: int, in_features: int) -> torch.Tensor:
    """A Q4_1F or Q8_0F weight (block rows with float32 constants, uint8 [N, row_bytes]) repacked for
    `amx_int8_linear`: per 16 output columns (N padded with zero columns) and block of 32 inputs, the
    codes in the int8 B tile's layout, then the 16 columns' d and m as float32 (m = 0 for Q8_0). Q4_1F:
    byte [i][column][e] holds the codes of inputs 4i + e (low nibble) and 16 + 4i + e (high), 256 bytes;
    Q8_0F: byte [i][column][e] the code of input 4i + e, 512 bytes."""
    if fmt not in AMX_INT8_PACK_BYTES:
        raise ValueError(f"AMX int8 products take Q4_1F or Q8_0F weights, not {fmt.name}")
    n, k = out_features, in_features
    if k % 32:
        raise ValueError("AMX int8 products need K a multiple of 32")
    blocks = stored_data.contiguous().view(n, k // 32, fmt.block_bytes)
    n_consts = 2 if fmt == WeightFormat.Q4_1F else 1
    consts = blocks[:, :, : 4 * n_consts].contiguous().view(torch.float32)  # [N, blocks, d (, m)]
    if n_consts == 1:
        consts = torch.cat([consts, torch.zeros_like(consts)], dim=2)
    if fmt == WeightFormat.Q4_1F:
        qs = blocks[:, :, 8:]  # [N, blocks, 16]: byte j holds the codes of inputs j (low) and j + 16 (high)
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=2)  # [N, blocks, 32], in input order
    else:
        codes = blocks[:, :, 4:]  # signed bytes, in input order
    n_pad = -(-n // AMX_INT8_GROUP) * AMX_INT8_GROUP
    if n_pad != n:
        codes = torch.cat([codes, codes.new_zeros((n_pad - n, k // 32, 32))])
        consts = torch.cat([consts, consts.new_zeros((n_pad - n, k // 32, 2))])
    groups, code_bytes = n_pad // AMX_INT8_GROUP, AMX_INT8_PACK_BYTES[fmt] - 128
    if fmt == WeightFormat.Q4_1F:
        halves = codes.view(groups, AMX_INT8_GROUP, k // 32, 2, 4, 4)  # [group, column, block, half, i, e]
        tile = (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [group, block, i, column, e]
    else:
        tile = codes.view(groups, AMX_INT8_GROUP, k // 32, 8, 4).permute(0, 2, 3, 1, 4)
    out = torch.empty((groups, k // 32, AMX_INT8_PACK_BYTES[fmt]), dtype=torch.uint8)
    out[:, :, :code_bytes] = tile.reshape(groups, k // 32, code_bytes)
    per_column = consts.view(groups, AMX_INT8_GROUP, k // 32, 2).permute(0, 2, 3, 1)  # [group, block, d/m, column]
    out[:, :, code_bytes:] = per_column.contiguous().view(torch.uint8).view(groups, k // 32, 128)
    return out


def amx_int8_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 times an `amx_int8_pack`ed weight [N, K] transposed (+ bias): [M, N] float32. x
    rounded to int16 per block of 32 values (as the int16 decode products), exact integer block sums
    on AMX's int8 tiles (only where `amx_int8_available()`)."""
    if not amx_int8_available():
        raise ValueError("AMX int8 products asked for where they do not run")
    _check(x, "x", torch.float32)
    _check(packed, "packed", torch.uint8)
    m, k = x.shape
    slots = -(-out_features // AMX_INT8_GROUP) * (k // 32) if k % 32 == 0 else -1
    fmt = next((f for f, size in AMX_INT8_PACK_BYTES.items() if packed.numel() == slots * size), None)
    if fmt is None:
        raise ValueError(f"packed AMX int8 weight of {packed.numel()} bytes does not hold [{out_features}, {k}]")
    if bias is not None:
        _check(bias, "bias", torch.float32)
    out = _product_out(out, m, out_features)
    _ext.amx_int8_linear(x.data_ptr(), m, k, packed.data_ptr(), out_features, 0 if bias is None else bias.data_ptr(),
                         out.data_ptr(), out_features, _threads(), int(fmt == WeightFormat.Q8_0F))
    return out


def amx_exact(packed: torch.Tensor, out_features: int, in_features: int) -> bool:
    """Whether an `amx_pack`ed weight holds its lo parts (exact products) or hi alone (bfloat16)."""
    n_pad = -(-out_features // AMX_COLS) * AMX_COLS
    if packed.numel() not in (n_pad * in_features, 2 * n_pad * in_features):
        raise ValueError(f"packed AMX weight of {packed.numel()} values does not hold [{out_features}, {in_features}]")
    return packed.numel() == 2 * n_pad * in_features


def amx_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 times an `amx_pack`ed weight [N, K] transposed (+ bias): [M, N] float32, on
    AMX tiles (only where `amx_available()`): with x split into bfloat16 hi and lo parts and three
    products when the weight holds its lo parts, else x rounded to bfloat16 and one product."""
    if not amx_available():  # (which also asks the OS for the tile state)
        raise ValueError("AMX products asked for where AMX does not run")
    _check(x, "x", torch.float32)
    _check(packed, "packed", torch.int16)
    m, k = x.shape
    if k % 32:
        raise ValueError("AMX products need K a multiple of 32")
    exact = amx_exact(packed, out_features, k)
    if bias is not None:
        _check(bias, "bias", torch.float32)
    out = _product_out(out, m, out_features)
    _ext.amx_linear(x.data_ptr(), m, k, packed.data_ptr(), out_features, 0 if bias is None else bias.data_ptr(),
                    out.data_ptr(), out_features, _threads(), int(exact))
    return out


def embedding(ids: torch.Tensor, weight: torch.Tensor, fmt: WeightFormat, dim: int) -> torch.Tensor:
    """Rows `ids` of the stored table [V, dim], as float32 [len(ids), dim]."""
    _check(ids, "ids", torch.int64)
    _check(weight, "weight")
    out = torch.empty((ids.numel(), dim), dtype=torch.float32)
    _ext.embedding(ids.data_ptr(), ids.numel(), weight.data_ptr(), int(fmt), dim, out.data_ptr(), _threads())
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """rmsnorm(x) * weight; with `residual`, first `residual += x` (in place) and normalise that."""
    _check(x, "x", torch.float32)
    _check(weight, "weight", torch.float32)
    if residual is not None:
        _check(residual, "residual", torch.float32)
        assert residual.shape == x.shape
    out = torch.empty_like(x)
    m, h = x.shape
    _ext.rmsnorm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(), m, h, eps,
                 out.data_ptr(), _threads())
    return out


def gated_linear(x: torch.Tensor, weight: torch.Tensor, fmt: WeightFormat, intermediate: int, *,
                 dot: str = "float", panels: str = "float") -> torch.Tensor:
    """silu(x gate^T) * (x up^T) for a stored weight [2 * intermediate, K] of gate rows then up rows:
    [M, intermediate] float32, as a decoder stack's MLP computes it (the fused forms where they run;
    `dot` and `panels` as for `linear`)."""
    _check(x, "x", torch.float32)
    _check(weight, "weight")
    m, k = x.shape
    n = 2 * intermediate
    if k % 32 or weight.numel() * weight.element_size() != n * fmt.row_bytes(k):
        raise ValueError(f"weight of {weight.numel() * weight.element_size()} bytes does not hold "
                         f"[{n}, {k}] in {fmt.name}")
    out = torch.empty((m, intermediate), dtype=torch.float32)
    _ext.gated_linear(x.data_ptr(), m, k, weight.data_ptr(), kernel_format(fmt, dot, panels), intermediate,
                      out.data_ptr(), _threads())
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [M, 2I] laid out as [gate | up]: [M, I]."""
    _check(x, "x", torch.float32)
    m, two_i = x.shape
    out = torch.empty((m, two_i // 2), dtype=torch.float32)
    _ext.silu_mul(x.data_ptr(), m, two_i // 2, out.data_ptr(), _threads())
    return out


def _row_stride(t: torch.Tensor, name: str) -> int:
    # t: [M, H, D] view whose heads and elements are contiguous, rows any distance apart
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        raise ValueError(f"{name} must be float32 on the CPU with contiguous heads")
    return t.stride(0)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
               k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, loc: torch.Tensor | None) -> None:
    """Rotate q [M, Hq, D] and k [M, Hkv, D] in place (half-split rotary, `table` [max_pos, D] as
    [cos | sin]); then, if a cache is given, store k and v [M, Hkv, D] at slots `loc` of the pool
    buffers [slots, Hkv, D] (converted to the pool's dtype)."""
    m, hq, d = q.shape
    hkv = k.shape[1]
    qs, ks, vs = _row_stride(q, "q"), _row_stride(k, "k"), _row_stride(v, "v")
    _check(positions, "positions", torch.int64)
    _check(table, "table", torch.float32)
    if d % 16 or table.shape[1] != d:
        raise ValueError("rotary head size must be a multiple of 16 and match the table")
    if k_cache is None:
        _ext.rope_store(q.data_ptr(), k.data_ptr(), v.data_ptr(), m, hq, hkv, d, qs, ks, vs, positions.data_ptr(),
                        table.data_ptr(), 0, 0, 0, 0, _threads())
        return
    _check(k_cache, "k_cache")
    _check(v_cache, "v_cache")
    _check(loc, "loc", torch.int64)
    if (k_cache.dtype not in CACHE_FORMATS or k_cache.shape[1:] != (hkv, _cache_row(d, k_cache.dtype))
            or v_cache.shape != k_cache.shape):
        raise ValueError("KV pool buffers must be [slots, Hkv, D] in float32, bfloat16 or float16, or int8 rows")
    _ext.rope_store(q.data_ptr(), k.data_ptr(), v.data_ptr(), m, hq, hkv, d, qs, ks, vs, positions.data_ptr(),
                    table.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), CACHE_FORMATS[k_cache.dtype],
                    loc.data_ptr(), _threads())


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_rows: torch.Tensor,
              q_off: torch.Tensor, q_len: torch.Tensor, slots: torch.Tensor, slot_off: torch.Tensor,
              kv_len: torch.Tensor, causal: bool, scale: float, out: torch.Tensor | None = None,
              lse: torch.Tensor | None = None, arith: str = "float") -> torch.Tensor:
    """Attention of query sequences over slot lists of the pool (see `attention` in csrc/kernels.h).

    q: [rows, Hq, D] float32 (heads contiguous, rows any distance apart); k_cache, v_cache: [slots, Hkv, D]; per sequence s: its query rows
    `q_rows[q_off[s] : q_off[s] + q_len[s]]` and its keys `slots.flatten()[slot_off[s] :][: kv_len[s]]`.
    Returns out [rows, Hq, D] float32 (rows no sequence lists are left as they were); fills `lse`
    [rows, Hq] with the log-sum-exp of the scaled scores when given. `arith` (ATTENTION_ARITH) says how
    tasks of many query rows (prefill, extend) compute: "float" in float32; "amx" on AMX tiles in three
    bfloat16 passes (near float32) or "amx-bf16" in one (only where `amx_available()`); "int16" on
    integer codes with AVX-512 VNNI (only where `int16_attention_available(D)`). Decode tasks read the
    pool in place in float32 whatever `arith`. Bounds are the caller's contract: the metadata builders
    derive them from the batch.
    """
    if arith not in ATTENTION_ARITH:
        raise ValueError(f"unknown attention arithmetic {arith!r}; choose from {', '.join(ATTENTION_ARITH)}")
    rows, hq, d = q.shape
    if arith.startswith("amx") and not amx_available():
        raise ValueError("AMX attention asked for where AMX does not run")
    if arith == "int16" and not int16_attention_available(d):
        raise ValueError(f"int16 attention asked for where it does not run (AVX-512 VNNI, head size {d})")
    q_row_stride = _row_stride(q, "q")
    for name, t in (("q_rows", q_rows), ("q_off", q_off), ("q_len", q_len), ("slots", slots),
                    ("slot_off", slot_off), ("kv_len", kv_len)):
        _check(t, name, torch.int64)
    _check(k_cache, "k_cache")
    _check(v_cache, "v_cache")
    hkv = k_cache.shape[1]
    if k_cache.dtype not in CACHE_FORMATS or k_cache.shape[2] != _cache_row(d, k_cache.dtype) or hq % hkv or d % 16:
        raise ValueError("bad attention shapes")
    if out is None:
        out = torch.empty((rows, hq, d), dtype=torch.float32)
    else:
        _check(out, "out", torch.float32)
    if lse is not None:
        _check(lse, "lse", torch.float32)
    num_seqs = q_len.numel()
    _ext.attention(q.data_ptr(), q_row_stride, q_rows.data_ptr(), q_off.data_ptr(), q_len.data_ptr(), slots.data_ptr(),
                   slot_off.data_ptr(), kv_len.data_ptr(), num_seqs, causal, k_cache.data_ptr(), v_cache.data_ptr(),
                   CACHE_FORMATS[k_cache.dtype], hq, hkv, d, scale, out.data_ptr(),
                   0 if lse is None else lse.data_ptr(), _threads(), ATTENTION_ARITH[arith])
    return out


def stack_fields() -> tuple[str, ...]:
    """Names of `decoder_stack`'s argument fields, in their order (see csrc/stack.h)."""
    return _ext.stack_fields()


def layer_fields() -> tuple[str, ...]:
    """Names of `decoder_stack`'s per-layer fields, in their order."""
    return _ext.layer_fields()


def decoder_stack(args: torch.Tensor, layers: torch.Tensor, eps: float, scale: float) -> None:
    """Run every layer of a decoder stack for one step (plait/runtime/cpu/stack.py builds the
    argument block `args` and the per-layer table `layers`, int64, and keeps what they point at alive)."""
    _check(args, "args", torch.int64)
    _check(layers, "layers", torch.int64)
    if args.numel() != len(stack_fields()) or layers.dim() != 2 or layers.shape[1] != len(layer_fields()):
        raise ValueError("decoder_stack argument block or layer table has the wrong size")
    _ext.decoder_stack(args.data_ptr(), layers.data_ptr(), eps, scale)
