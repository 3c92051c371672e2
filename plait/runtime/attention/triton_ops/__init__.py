"""Triton attention kernels over the token pool: extend (prefill with a cached prefix) and split-KV decode."""

from plait.runtime.attention.triton_ops.decode import (
    DecodeConfig,
    SharedPrefixes,
    decode_attention,
    decode_config,
    SHARED_STEP_BLOCK_N,
    SHARED_STEP_SPLITS,
    shared_prefix_plan,
    shared_step_stages,
    smem_bytes,
    warm_up_shared_prefix_decode,
)
from plait.runtime.attention.triton_ops.extend import extend_attention

__all__ = [
    "DecodeConfig", "SharedPrefixes", "decode_attention", "decode_config", "extend_attention",
    "SHARED_STEP_BLOCK_N", "SHARED_STEP_SPLITS", "shared_prefix_plan", "shared_step_stages", "smem_bytes",
    "warm_up_shared_prefix_decode",
]
