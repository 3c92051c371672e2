"""Which arithmetic the CPU kernels' products use, chosen once at load from the settings and the CPU.

Two sizes of product: decode-sized ones (up to 8 rows), bound by reading the weights, and the larger
ones of a prefill, bound by arithmetic. `resolve_decode_products` and `resolve_prefill_products` turn
`--cpu-decode-products` / `--cpu-prefill-products` ("auto" or a named path) into the path that runs,
refusing a path this CPU cannot run; `configure_products` applies both to a loaded model's layers
(packing weights where a path needs it) and describes the result for the startup log and
`/get_server_info`, with the arithmetic of the prefill's attention (`resolve_prefill_attention`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from plait.runtime.config import ModelConfig
from plait.runtime.cpu import kernels, panels
from plait.runtime.cpu.linear import AMX_INT8_ROWS, DECODE_ROWS, Q4_PANEL_MAX_ROWS, CpuLinear

logger = logging.getLogger(__name__)

DECODE_PRODUCTS = {
    "int16": "up to 8 rows (decode): block weights times int16-rounded activations in integers; ",
    "int8": "up to 8 rows (decode): block weights times int8-rounded activations in integers; ",
    "float": "up to 8 rows (decode): stored blocks decoded in registers, float32 products; ",
}
PREFILL_PRODUCTS = ("amx", "amx-bf16", "int14", "int16", "float")
PREFILL_ATTENTION = ("int16", "float")


def resolve_decode_products(config: ModelConfig) -> str:
    """How the CPU kernels multiply decode-sized products with block weights: "auto" is int16 (nearly
    the float32 product at the integer path's speed) when the dtype is chosen automatically too, and
    float32 products when the user asked for a dtype; --enable-cpu-int8-dot means int8."""
    name = "int8" if config.enable_cpu_int8_dot else config.cpu_decode_products
    if name == "auto":
        return "int16" if config.dtype == "auto" else "float"
    if name not in DECODE_PRODUCTS:
        raise ValueError(f"unknown cpu_decode_products {name!r}; choose from auto, {', '.join(DECODE_PRODUCTS)}")
    return name


def resolve_prefill_products(config: ModelConfig) -> str:
    """How the CPU kernels multiply products of more than 8 rows: "auto" is "amx" where the CPU and OS
    run AMX and the dtype is chosen automatically too (a dtype the user asked for keeps float32
    products), else "int14" where the CPU has AVX-512 VNNI, else "float"; "amx", "amx-bf16", "int14"
    or "int16" when asked (an error where they cannot run)."""
    name = config.cpu_prefill_products
    if name != "auto" and name not in PREFILL_PRODUCTS:
        raise ValueError(f"unknown cpu_prefill_products {name!r}; choose from auto, {', '.join(PREFILL_PRODUCTS)}")
    if name == "auto":
        if config.dtype != "auto":
            return "float"
        if kernels.amx_available():
            return "amx"
        return "int14" if kernels.int16_panels_available() else "float"
    if name == "float":
        return "float"
    if name in ("int14", "int16"):
        if not kernels.int16_panels_available():
            raise ValueError(f"--cpu-prefill-products {name}: this CPU has no AVX-512 VNNI (or "
                             "PLAIT_DISABLE_CPU_AVX512 is set)")
        return name
    if not kernels.amx_available():
        raise ValueError(f"--cpu-prefill-products {name}: this CPU or OS does not run AMX bfloat16 tiles "
                         "(or PLAIT_DISABLE_CPU_AMX is set)")
    return name


def resolve_prefill_attention(config: ModelConfig, prefill_products: str, head_dim: int) -> str:
    """How the CPU kernels' attention of many query rows (prefill, extend) multiplies, given the
    prefill products that run: "amx" with AMX products (the AMX tiles take the attention too); "auto"
    is "int16" where it runs here (AVX-512 VNNI, the head size) and the dtype is chosen automatically,
    else "float"; "int16" when asked (an error where it cannot run)."""
    name = config.cpu_prefill_attention
    if name != "auto" and name not in PREFILL_ATTENTION:
        raise ValueError(f"unknown cpu_prefill_attention {name!r}; choose from auto, {', '.join(PREFILL_ATTENTION)}")
    if name == "int16" and not kernels.int16_attention_available(head_dim):
        raise ValueError(f"--cpu-prefill-attention int16: this CPU has no AVX-512 VNNI (or PLAIT_DISABLE_CPU_AVX512 "
                         f"is set), or the head size {head_dim} is not 32, 64, 96 or 128")
    if prefill_products in ("amx", "amx-bf16"):
        return "amx"
    if name == "auto":
        auto = config.dtype == "auto" and kernels.int16_attention_available(head_dim)
        return "int16" if auto else "float"
    return name


def configure_products(model: nn.Module, config: ModelConfig, available_bytes: int | None) -> dict[str, Any]:
    """Set the decode and prefill paths on every `CpuLinear` of `model` (packing weights for AMX where it
    runs and their copies fit in half of `available_bytes`, unless asked for) and return what runs, as
    entries of the runner's execution info."""
    dot = resolve_decode_products(config)
    linears = list({id(m): m for m in model.modules() if isinstance(m, CpuLinear)}.values())
    blocks = [m for m in linears if m.stored.fmt.block_bytes is not None]
    for module in blocks:
        module.stored.decode_dot = dot
    prefill = resolve_prefill_products(config)
    packed_bytes = 0
    if prefill in ("amx", "amx-bf16"):
        # the packed weights sit beside the stored ones: 4 bytes a weight (2 for amx-bf16)
        packed_bytes = sum(-(-m.out_features // 32) * 32 * m.in_features for m in linears) * (
            4 if prefill == "amx" else 2)
        if available_bytes is not None and packed_bytes > available_bytes // 2 and config.cpu_prefill_products == "auto":
            logger.info("CPU kernels: AMX products off: their packed weights (%.1f GiB) would take more than "
                        "half the memory available (%.1f GiB); --cpu-prefill-products amx to force them",
                        packed_bytes / 2**30, available_bytes / 2**30)
            prefill = "float"
    if prefill == "int14":
        # the decoder's block weights rounded to 14 bits per row beside the stored ones: 2 bytes a weight
        # (the LM head keeps its exact codes: its int16 panels below)
        layers = [m for m in blocks if m is not getattr(model, "logits_head", None)]
        int14_bytes = sum(2 * m.out_features * m.in_features for m in layers)
        if available_bytes is not None and int14_bytes > available_bytes // 2 and config.cpu_prefill_products == "auto":
            logger.info("CPU kernels: int14 products off: their weights (%.1f GiB) would take more than half the "
                        "memory available (%.1f GiB); --cpu-prefill-products int14 to force them",
                        int14_bytes / 2**30, available_bytes / 2**30)
            prefill = "int16"
        elif not any([m.pack_int14() for m in layers]):
            prefill = "int16"
        else:
            logger.info("CPU kernels: products of more than 8 rows on the block weights rounded to 14 bits per "
                        "row (%.0f MiB), x to 14 bits per 32 values", int14_bytes / 2**20)
    if prefill in ("int14", "int16"):
        # x rounded to int16 per block, integer products on AVX-512 VNNI: the block weights (float
        # formats keep the float32 panels)
        for module in blocks:
            module.stored.panel_dot = "int16"
        if not blocks:
            prefill = "float"
    # The LM head (run from Python, every row of a decode batch) laid out once in the int16 panels' order
    # where it is 8-bit: a 32-request step's LM head product took 0.75 of the time (tied embeddings: a
    # second copy of the table, as many bytes).
    head = getattr(model, "logits_head", None)
    head_panels_mib = None
    if prefill in ("int14", "int16") and isinstance(head, CpuLinear) and head.stored.panel_dot == "int16" and head.pack_int16_panels():
        head_panels_mib = round(head.int16_panels.numel() / 2**20, 1)
        logger.info("CPU kernels: the LM head laid out for the int16 panels (%.0f MiB)", head_panels_mib)
    if prefill in ("amx", "amx-bf16"):
        for module in linears:
            module.pack_amx(exact=prefill == "amx")
        logger.info("CPU kernels: products of more than 8 rows on AMX tiles, %s (weights packed: %.0f MiB)",
                    "three bfloat16 passes" if prefill == "amx" else "bfloat16", packed_bytes / 2**20)
    # float32 panels of more than 8 rows: 512-bit registers where the CPU has AVX-512
    panel_isa = "avx512" if kernels.avx512_products() else "avx2"
    # Decode-sized batches of Q4_1 weights on AMX's int8 tiles: the int16 decode products' arithmetic
    # (exact integer block sums), reading 0.75 bytes a weight rather than the 4 of the AMX packing;
    # where AMX runs and the decode products are int16.
    int8_rows = None
    if prefill in ("amx", "amx-bf16") and dot == "int16" and kernels.amx_int8_available():
        repacked = [m for m in linears if m.pack_amx_int8()]
        if repacked:
            int8_rows = list(AMX_INT8_ROWS)
            logger.info("CPU kernels: products of %d to %d rows of Q4_1 weights on AMX int8 tiles (x in int16; "
                        "%d weights repacked: %.0f MiB)", *AMX_INT8_ROWS, len(repacked),
                        sum(m.amx_int8.numel() for m in repacked) / 2**20)
    # Decode-sized products of 4-bit weights with the output columns in the lanes (q4_panel_pack: the
    # codes laid out once in panels of 16 columns, as many bytes as the stored rows): the int16 decode
    # products' rounding and exact block sums, about half their time for 8 rows on a 2-core Zen 4, and
    # faster than the int14 weights up to Q4_PANEL_MAX_ROWS rows (CpuLinear and the stack pick by rows).
    q4_panels_mib = None
    if blocks and dot == "int16" and panels.q4_panels_available():
        fours = [m for m in blocks if m.stored.fmt in panels.Q4_PANEL_PACKS]
        q4_bytes = sum(m.stored.nbytes for m in fours)
        if fours and available_bytes is not None and q4_bytes > available_bytes // 2:
            logger.info("CPU kernels: 4-bit panels off: their copy (%.1f GiB) would take more than half the memory "
                        "available (%.1f GiB)", q4_bytes / 2**30, available_bytes / 2**30)
        elif fours:
            for module in fours:
                module.pack_q4_panels()
            q4_panels_mib = round(sum(m.q4_panels.numel() for m in fours) / 2**20, 1)
            logger.info("CPU kernels: products of up to %d rows of the 4-bit weights on panels of 16 columns "
                        "(%d weights laid out: %.0f MiB)", DECODE_ROWS if prefill in ("amx", "amx-bf16") else Q4_PANEL_MAX_ROWS,
                        len(fours), q4_panels_mib)
    attention = resolve_prefill_attention(config, prefill, model.arch.head_dim)
    if attention == "int16":
        logger.info("CPU kernels: prefill attention on integer codes (13-bit q and k, 14-bit weights and values; "
                    "AVX-512 VNNI)")
    return {
        "decode_products": dot if blocks else "float",
        "prefill_products": prefill,
        "prefill_attention": attention,
        "panel_products": panel_isa,
        "decode_products_amx_int8_rows": int8_rows,
        "logits_head_int16_panels_mib": head_panels_mib,
        "decode_products_q4_panels_mib": q4_panels_mib,
        "products": (DECODE_PRODUCTS[dot] if blocks else "up to 8 rows (decode): stored weights decoded in registers; ")
        + {"amx": "more rows (prefill): AMX tiles, bfloat16 hi/lo parts of x and w, three passes",
           "amx-bf16": "more rows (prefill): AMX tiles, x and w rounded to bfloat16",
           "int14": "more rows (prefill): weights rounded to 14 bits per row, x to 14 bits per 32 values, integer "
                    "products (AVX-512 VNNI)",
           "int16": "more rows (prefill): x rounded to int16 per 32 values, integer products (AVX-512 VNNI)",
           "float": f"more rows (prefill): decoded into float32 panels ({panel_isa})"}[prefill],
    }
