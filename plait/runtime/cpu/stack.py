"""The CPU "graph": a model's whole decoder stack run by one native call per step.

A small model's CPU step is thousands of small operations; dispatching each from Python (module
calls, tensor checks, allocations) costs about as much as computing it. `CpuDecoderStack` hands
the step to `decoder_stack` (csrc/stack_avx2.cpp) instead, which runs every layer over the same
kernels the layer modules call. It plays the part CUDA graphs play on a GPU, without their
padding or capture: each batch shape runs as it comes, so nothing is compiled at start-up.

Built once from a model converted to the kernels (`convert.py`) and the KV pool: every layer's
weight and cache pointers go into one int64 table. Per step, the arguments (activation buffers,
positions, slots, the attention backend's index tensors) go into one int64 block, by field name.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.runtime.cpu import kernels
from plait.runtime.cpu.layers import CpuRMSNorm, CpuRotaryEmbedding
from plait.runtime.cpu.linear import AMX_INT8_ROWS, Q4_PANEL_MAX_ROWS, CpuEmbedding, CpuLinear

_FIELDS = {name: i for i, name in enumerate(kernels.stack_fields())} if kernels.available() else {}
_LAYER_FIELDS = {name: i for i, name in enumerate(kernels.layer_fields())} if kernels.available() else {}


# Up to this many rows a product reads the stored weights block by block in registers (the decode
# kernel); above it, it decodes panels of them into float32 first (the panel kernel). Mirrors
# kGemvMaxRows in csrc/linear_avx2.cpp.
DECODE_KERNEL_MAX_ROWS = 8


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class CpuDecoderStack:
    """Runs `model.model` (embedding, layers, final norm) for a batch in one native call."""

    def __init__(self, model: nn.Module, kv_pool, prefill_attention: str = "float") -> None:
        reason = self.unsupported(model, kv_pool)
        assert reason is None, reason
        arch = model.arch
        self.arch = arch
        decoder = model.model
        self.embed: CpuEmbedding = decoder.embed_tokens
        self.norm: CpuRMSNorm = decoder.norm
        self.rope_table = decoder.rotary._table(torch.device("cpu"))
        self.cache_fmt = kernels.CACHE_FORMATS[kv_pool.dtype]
        self.eps = float(arch.rms_norm_eps)
        # prefill and extend attention on integer codes (the stack takes AMX attention with AMX weights)
        self.int_attention = int(prefill_attention == "int16")
        self.scale = float(arch.head_dim**-0.5)
        table = torch.zeros((arch.num_layers, len(_LAYER_FIELDS)), dtype=torch.int64)
        self._keep: list[torch.Tensor] = []  # everything the table points at stays alive with it
        for i, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            k_buf, v_buf = kv_pool.layer_buffers(i)
            row = {
                "qkv_w": attn.qkv_proj.stored.data, "qkv_fmt": attn.qkv_proj.stored.kernel_format,
                "qkv_bias": attn.qkv_proj.bias, "o_w": attn.o_proj.stored.data, "o_fmt": attn.o_proj.stored.kernel_format,
                "gate_up_w": mlp.gate_up_proj.stored.data, "gate_up_fmt": mlp.gate_up_proj.stored.kernel_format,
                "down_w": mlp.down_proj.stored.data, "down_fmt": mlp.down_proj.stored.kernel_format,
                "in_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
                "q_norm": attn.q_norm.weight if arch.qk_norm else None,
                "k_norm": attn.k_norm.weight if arch.qk_norm else None,
                "k_cache": k_buf, "v_cache": v_buf,
                "qkv_amx": attn.qkv_proj.amx, "o_amx": attn.o_proj.amx, "gate_up_amx": mlp.gate_up_proj.amx,
                "down_amx": mlp.down_proj.amx,
                "qkv_i8": attn.qkv_proj.amx_int8, "o_i8": attn.o_proj.amx_int8, "gate_up_i8": mlp.gate_up_proj.amx_int8,
                "down_i8": mlp.down_proj.amx_int8,
                "qkv_i14": attn.qkv_proj.int14, "o_i14": attn.o_proj.int14, "gate_up_i14": mlp.gate_up_proj.int14,
                "down_i14": mlp.down_proj.int14,
                "qkv_q4": attn.qkv_proj.q4_panels, "o_q4": attn.o_proj.q4_panels,
                "gate_up_q4": mlp.gate_up_proj.q4_panels, "down_q4": mlp.down_proj.q4_panels,
            }
            for name, value in row.items():
                if isinstance(value, int):
                    table[i, _LAYER_FIELDS[name]] = value
                else:
                    table[i, _LAYER_FIELDS[name]] = _ptr(value)
                    if value is not None:
                        self._keep.append(value)
        self.layer_table = table
        # Steps by the product kernel their size picks (the C++ side decides by rows: see
        # kGemvMaxRows in csrc/linear_avx2.cpp), reported in /get_server_info.
        amx = attn.qkv_proj.amx is not None
        self.amx_exact = int(amx and kernels.amx_exact(attn.qkv_proj.amx, attn.qkv_proj.out_features, attn.qkv_proj.in_features))
        self._large_step = ("amx_kernel" if amx else "int14_kernel" if attn.qkv_proj.int14 is not None
                            else "panel_kernel")
        q4 = attn.qkv_proj.q4_panels is not None
        self._small_step = "q4_panel_kernel" if q4 else "decode_kernel"
        self._small_rows = Q4_PANEL_MAX_ROWS if q4 and not amx else DECODE_KERNEL_MAX_ROWS
        self.steps = {self._small_step: 0, self._large_step: 0}
        # decode-sized steps on the layers' AMX int8 packing (rows AMX_INT8_ROWS), where they have one
        self.int8_rows = AMX_INT8_ROWS if attn.qkv_proj.amx_int8 is not None else (0, -1)
        if attn.qkv_proj.amx_int8 is not None:
            self.steps["amx_int8_kernel"] = 0

    @staticmethod
    def unsupported(model: nn.Module, kv_pool) -> str | None:
        """Why the stack cannot run this model (None: it can)."""
        if not kernels.available():
            return "the CPU kernels are not available"
        decoder = getattr(model, "model", None)
        if decoder is None or not hasattr(model, "arch"):
            return f"{type(model).__name__} is not a Llama-family decoder"
        if getattr(model, "tp", None) is not None and model.tp.size > 1:
            return "tensor parallelism: the native stack has no all-reduce between layers, the layers run one by one"
        if not isinstance(decoder.embed_tokens, CpuEmbedding) or not isinstance(decoder.rotary, CpuRotaryEmbedding):
            return "the embedding or rotary embedding is not on the kernels"
        if kv_pool.dtype not in kernels.CACHE_FORMATS:
            return f"KV pool dtype {kv_pool.dtype} is not read by the kernels"
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                if not isinstance(proj, CpuLinear):
                    return "a projection is not on the kernels"
            if attn.o_proj.bias is not None or mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None:
                return "biases outside the QKV projection"
        return None

    @torch.inference_mode()
    def forward(self, batch, meta, out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden] of `batch`, given the CPU attention backend's
        metadata `meta` for it. With `out_rows` (int64 row indices), only those rows are asked for:
        a step of more than the decode rows then runs its last layer's output product and MLP on them
        alone (every row's K and V are still stored), and the other rows come back stale."""
        arch = self.arch
        num_tokens = batch.num_tokens
        if self.int8_rows[0] <= num_tokens <= self.int8_rows[1]:
            self.steps["amx_int8_kernel"] += 1
        else:
            self.steps[self._small_step if num_tokens <= self._small_rows else self._large_step] += 1
        x = self.embed(batch.input_ids)  # [T, H]
        residual = torch.empty_like(x)
        hq, hkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        bufs = {
            "qkv": torch.empty((num_tokens, (hq + 2 * hkv) * d)),
            "attn": torch.empty((num_tokens, hq * d)),
            "normed": torch.empty((num_tokens, arch.hidden_size)),
            "gate_up": torch.empty((num_tokens, 2 * arch.intermediate_size)),
            "act": torch.empty((num_tokens, arch.intermediate_size)),
        }
        positions = batch.positions.contiguous()
        loc = batch.out_cache_loc.contiguous()
        values = {
            "num_layers": arch.num_layers, "tokens": num_tokens, "hidden": arch.hidden_size, "heads": hq,
            "kv_heads": hkv, "head_dim": d, "intermediate": arch.intermediate_size, "cache_fmt": self.cache_fmt,
            "num_threads": torch.get_num_threads(), "amx_exact": self.amx_exact,
            "int8_min_rows": self.int8_rows[0], "int8_max_rows": self.int8_rows[1],
            "int_attention": self.int_attention,
            "num_out_rows": 0 if out_rows is None else out_rows.numel(),
            "x": x, "residual": residual, "positions": positions, "rope_table": self.rope_table, "loc": loc,
            **bufs,
        }
        if out_rows is not None:
            values["out_rows"] = out_rows.to(torch.int64).contiguous()
        main = meta.main
        values.update({
            "main_q_rows": main.q_rows, "main_q_off": main.q_off, "main_q_len": main.q_len,
            "main_slots": main.slots, "main_slot_off": main.slot_off, "main_kv_len": main.kv_len,
            "main_num_seqs": main.q_len.numel(), "main_causal": int(main.causal),
        })
        if meta.prefixes is not None:
            pre = meta.prefixes
            values.update({
                "pre_q_rows": pre.q_rows, "pre_q_off": pre.q_off, "pre_q_len": pre.q_len, "pre_slots": pre.slots,
                "pre_slot_off": pre.slot_off, "pre_kv_len": pre.kv_len, "pre_num_seqs": pre.q_len.numel(),
                "cascade_rows": meta.cascade_rows, "num_cascade_rows": meta.cascade_rows.numel(),
                "out_prefix": torch.empty((num_tokens, hq * d)), "lse_prefix": torch.empty((num_tokens, hq)),
                "lse_own": torch.empty((num_tokens, hq)),
            })
        fields = [0] * len(_FIELDS)
        for name, value in values.items():  # `values` keeps the tensors alive through the call
            if isinstance(value, torch.Tensor):
                assert value.is_contiguous() and value.device.type == "cpu", name
                value = value.data_ptr()
            fields[_FIELDS[name]] = value
        kernels.decoder_stack(torch.tensor(fields, dtype=torch.int64), self.layer_table, self.eps, self.scale)
        return self.norm(x, residual)[0]
