"""Triton attention kernels over the token pool: extend (prefill with a cached prefix) and split-KV decode."""

from plait.runtime.attention.triton_ops.decode import (
    DecodeConfig,
    decode_attention,
    decode_config,
    smem_bytes,
)
from plait.runtime.attention.triton_ops.extend import extend_attention

__all__ = ["DecodeConfig", "decode_attention", "decode_config", "extend_attention", "smem_bytes"]
