"""The decoder's small layers on the CPU kernels: one pass over the data each, instead of the five
to ten PyTorch operations (and temporaries) of their reference forms, which dominate a CPU decode
step of a small model. Inputs the kernels do not take (other dtypes, strided views) use the
reference forms, so these are drop-in replacements: `convert.convert_remaining` switches a loaded
model's modules to them by class, since they add no state."""

from __future__ import annotations

import torch

from plait.runtime.cpu import kernels
from plait.runtime.layers.activation import SiluAndMul
from plait.runtime.layers.norm import RMSNorm
from plait.runtime.layers.rotary import RotaryEmbedding, RotaryInputs


def _fits(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous() and x.device.type == "cpu"


class CpuRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # Updates `residual` in place (it is the layer stack's own running sum) and returns it.
        if _fits(x) and (residual is None or (_fits(residual) and residual.shape == x.shape)):
            out = kernels.rmsnorm(x, self.weight, self.eps, residual=residual)
            return out if residual is None else (out, residual)
        return self.forward_native(x, residual)


class CpuSiluAndMul(SiluAndMul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_mul(x) if _fits(x) else self.forward_native(x)


class CpuRotaryEmbedding(RotaryEmbedding):
    """Hands the kernel the positions and the whole table (`apply_rotary_and_store` then rotates q
    and k and stores K/V in one pass) instead of gathering cos and sin per step."""

    def cos_sin(self, positions: torch.Tensor) -> RotaryInputs:
        return RotaryInputs(None, None, positions, self._table(positions.device))
