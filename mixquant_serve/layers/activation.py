"""Gated activation of the MLP: act(gate) * up over a merged [.., 2*I] projection (SiLU on CUDA: one kernel,
which also quantizes its output when the next linear's `input_quant` asks for FP8 per token or the folded
NVFP4 operand)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixquant_serve.config import ConfigError
from mixquant_serve.quant.methods import (
    FP8_PER_TOKEN,
    GEMV_PROLOGUE,
    NVFP4_FOLDED,
    DeferredSiluMul,
    InputQuant,
    QuantizedActivation,
    small_batch_gemv,
)

_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedAct(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTS:
            raise ConfigError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTS)}")
        self.act = _ACTS[name]
        self.name = name

    def forward(self, gate_up: torch.Tensor, quant: InputQuant | None = None
                ) -> torch.Tensor | QuantizedActivation | DeferredSiluMul:
        """``act(gate) * up``; quantized as `quant` asks when a CUDA kernel does it (else the plain tensor), or
        left to a small-batch GEMV (GEMV_PROLOGUE, where `small_batch_gemv` says so)."""
        if quant == GEMV_PROLOGUE and self.name == "silu" and small_batch_gemv(gate_up):
            return DeferredSiluMul(gate_up)
        if gate_up.is_cuda and self.name == "silu":
            from mixquant_serve.kernels.silu_mul import silu_mul, silu_mul_fp8, silu_mul_nvfp4

            if quant == FP8_PER_TOKEN:
                return QuantizedActivation(*silu_mul_fp8(gate_up), gate_up.dtype)
            if quant == NVFP4_FOLDED:
                return QuantizedActivation(*silu_mul_nvfp4(gate_up), gate_up.dtype)
            return silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up
