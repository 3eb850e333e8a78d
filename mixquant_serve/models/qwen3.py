"""Qwen3: the Llama decoder with a per-head RMSNorm on q and k before the rotary embedding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixquant_serve.config import ModelConfig
from mixquant_serve.layers.norm import RMSNorm
from mixquant_serve.layers.rotary import RotaryEmbedding
from mixquant_serve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer_id: int, rotary: RotaryEmbedding, precisions: Sequence[str],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(cfg, layer_id, rotary, precisions, dtype, device)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype).to(device)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype).to(device)

    def qk_norm(self) -> tuple[RMSNorm, RMSNorm]:
        return self.q_norm, self.k_norm


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
