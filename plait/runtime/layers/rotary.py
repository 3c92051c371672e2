"""Rotary position embedding (the half-split layout of Hugging Face Llama), with RoPE scaling.

Scaling kinds: none/default, `linear`, `llama3` (the frequency-dependent scaling of Llama 3.1+),
`dynamic` is rejected with a clear error rather than silently computed wrong.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class RotaryInputs(NamedTuple):
    """What one step's layers need to rotate q and k, computed once per step by `cos_sin`."""

    cos: torch.Tensor | None  # [num_tokens, 1, head_dim / 2] float32; None when the fused kernel reads the table
    sin: torch.Tensor | None
    positions: torch.Tensor  # [num_tokens]
    table: torch.Tensor  # [max_position, head_dim] float32, [cos | sin] halves


def _inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    # Built on the CPU explicitly: models may be constructed on the meta device.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_context_len = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between blended.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, blended, scaled)
    raise NotImplementedError(f"RoPE scaling type {kind!r} is not supported")


class RotaryEmbedding(nn.Module):
    """Applies RoPE at given positions from a cos/sin table over positions [0, max_position)."""

    def __init__(self, head_dim: int, *, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.inv_freq = _inv_freq(head_dim, base, scaling)  # [head_dim / 2] float32, not a parameter
        self._cos_sin: torch.Tensor | None = None  # [cached_len, head_dim] as [cos | sin] halves

    def _table(self, device: torch.device) -> torch.Tensor:
        # The whole table at once (max_position x head_dim floats): lookups then never read a
        # position back from the device, which would sync the GPU and break graph capture.
        if self._cos_sin is None or self._cos_sin.device != device:
            t = torch.arange(self.max_position, dtype=torch.float32, device=device)
            freqs = torch.outer(t, self.inv_freq.to(device))  # [max_position, head_dim / 2]
            self._cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        return self._cos_sin

    def cos_sin(self, positions: torch.Tensor) -> RotaryInputs:
        """cos and sin at `positions`, each [num_tokens, 1, head_dim / 2] float32; computed once per step.

        On CUDA with a power-of-two head size the fused kernel looks positions up in the table
        itself, so nothing is gathered here.
        """
        table = self._table(positions.device)
        if positions.is_cuda and self.head_dim & (self.head_dim - 1) == 0:
            return RotaryInputs(None, None, positions, table)
        cos, sin = table[positions].unsqueeze(1).chunk(2, dim=-1)
        return RotaryInputs(cos, sin, positions, table)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k rotated at the step's positions. The fused path (CUDA) rotates them in place and returns them."""
    # q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim]
    if rotary.cos is None:
        if rotary.positions.is_cuda:
            from plait.runtime.layers.triton_ops import rotary_inplace

            rotary_inplace(q, k, rotary.positions, rotary.table)
        else:
            from plait.runtime.cpu import kernels

            kernels.rope_store(q, k, k, rotary.positions, rotary.table, None, None, None)
        return q, k
    return apply_rotary_native(q, k, rotary)


def apply_rotary_and_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rotary: RotaryInputs,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_loc: torch.Tensor,
) -> bool:
    """On the fused path (the Triton kernel on CUDA, the C++ kernel on the CPU), rotate q and k in place
    and store the rotated k and v at `cache_loc` of the layer's KV pool buffers, in one kernel;
    returns whether it did (False: nothing was done)."""
    if rotary.cos is not None:
        return False
    if rotary.positions.is_cuda:
        from plait.runtime.layers.triton_ops import rotary_inplace

        rotary_inplace(q, k, rotary.positions, rotary.table, v=v, k_cache=k_cache, v_cache=v_cache,
                       cache_loc=cache_loc)
    else:  # CPU kernels (plait/runtime/cpu/layers.py hands out RotaryInputs without cos/sin)
        from plait.runtime.cpu import kernels

        kernels.rope_store(q, k, v, rotary.positions, rotary.table, k_cache, v_cache, cache_loc)
    return True


def apply_rotary_native(q: torch.Tensor, k: torch.Tensor, rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary.cos, rotary.sin
    if cos is None:
        cos, sin = rotary.table[rotary.positions].unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
