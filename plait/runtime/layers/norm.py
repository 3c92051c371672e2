"""RMSNorm, with the residual add fused into the same call (the pre-norm transformer pattern)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual).

        The statistics are computed in float32 as the reference implementation does, so
        half-precision runs match it to rounding. On CUDA one fused kernel does the whole call.
        """
        if x.is_cuda and x.dim() == 2 and x.stride(-1) == 1 and (
            residual is None or (residual.stride(-1) == 1 and residual.dtype == x.dtype)
        ):
            from plait.runtime.layers.triton_ops import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual)
        return self.forward_native(x, residual)

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        orig_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(orig_dtype)
        return out if residual is None else (out, residual)
