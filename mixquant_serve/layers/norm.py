"""RMSNorm, computed as Hugging Face does (float32 statistics, weight applied in the input dtype).

On CUDA one Triton kernel (`kernels/rmsnorm.py`) does the whole norm, and `add_norm` folds the residual add
of the decoder layer into it; elsewhere the same arithmetic runs as PyTorch ops.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from mixquant_serve.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)[0]
        return self._eager(x)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``: the decoder layer's residual add and the next norm."""
        if x.is_cuda:
            from mixquant_serve.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual)
        total = x + residual
        return self._eager(total), total

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)
