"""RMSNorm, computed as Hugging Face does (float32 statistics, weight applied in the input dtype).

On CUDA one Triton kernel (`kernels/rmsnorm.py`) does the whole norm, and `add_norm` folds the residual add
of the decoder layer into it; elsewhere the same arithmetic runs as PyTorch ops. Given the next linear's
`input_quant`, the CUDA kernel also quantizes its output (FP8 per token, or the folded NVFP4 operand) and
returns a QuantizedActivation.
"""

from __future__ import annotations

import torch
from torch import nn

from mixquant_serve.quant.methods import (
    FP8_PER_TOKEN,
    GEMV_PROLOGUE,
    NVFP4_FOLDED,
    DeferredRMSNorm,
    InputQuant,
    QuantizedActivation,
    small_batch_gemv,
)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, quant: InputQuant | None = None
                ) -> torch.Tensor | QuantizedActivation | DeferredRMSNorm:
        """``norm(x)``; quantized as `quant` asks when this runs on CUDA (else the plain tensor), or left to a
        small-batch GEMV (GEMV_PROLOGUE, where `small_batch_gemv` says so)."""
        if quant == GEMV_PROLOGUE and small_batch_gemv(x):
            return DeferredRMSNorm(x, None, self.weight, self.eps, None)
        if x.is_cuda:
            return self._kernel(x, None, quant)[0]
        return self._eager(x)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, quant: InputQuant | None = None
                 ) -> tuple[torch.Tensor | QuantizedActivation | DeferredRMSNorm, torch.Tensor]:
        """``(norm(x + residual), x + residual)``: the decoder layer's residual add and the next norm."""
        if quant == GEMV_PROLOGUE and small_batch_gemv(x):
            total = torch.empty_like(x)  # the GEMV writes x + residual here
            return DeferredRMSNorm(x, residual, self.weight, self.eps, total), total
        if x.is_cuda:
            return self._kernel(x, residual, quant)
        total = x + residual
        return self._eager(total), total

    def _kernel(self, x: torch.Tensor, residual: torch.Tensor | None, quant: InputQuant | None
                ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor | None]:
        from mixquant_serve.kernels.rmsnorm import rmsnorm, rmsnorm_fp8, rmsnorm_nvfp4

        if quant in (FP8_PER_TOKEN, NVFP4_FOLDED):
            fused = rmsnorm_fp8 if quant == FP8_PER_TOKEN else rmsnorm_nvfp4
            q, scale, total = fused(x, self.weight, self.eps, residual)
            return QuantizedActivation(q, scale, x.dtype), total
        return rmsnorm(x, self.weight, self.eps, residual)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)
