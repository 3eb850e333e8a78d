"""Gated activation of the MLP: act(gate) * up over a merged [.., 2*I] projection (SiLU on CUDA: one kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixquant_serve.config import ConfigError

_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedAct(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTS:
            raise ConfigError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTS)}")
        self.act = _ACTS[name]
        self.name = name

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.is_cuda and self.name == "silu":
            from mixquant_serve.kernels.silu_mul import silu_mul

            return silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up
