"""Llama-architecture decoder (Llama, Mistral-style, SmolLM2; Qwen2 = Llama with q/k/v bias).

Tokens are flattened across the batch: hidden states are [T, hidden]. Attention layout and precision
come from the forward context, so this file is the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mixquant_serve.config import ModelConfig
from mixquant_serve.layers.activation import GatedAct
from mixquant_serve.layers.attention.base import Attention
from mixquant_serve.layers.embedding import LMHead, VocabEmbedding
from mixquant_serve.layers.forward_context import get_forward_context
from mixquant_serve.layers.linear import MergedColumnLinear, QKVLinear, RowLinear
from mixquant_serve.layers.norm import RMSNorm
from mixquant_serve.layers.rotary import RotaryEmbedding
from mixquant_serve.quant.methods import QuantizedActivation


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, rotary: RotaryEmbedding, precisions: Sequence[str],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = QKVLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                  cfg.attention_bias, precisions, dtype, device)
        self.o_proj = RowLinear(cfg.q_size, cfg.hidden_size, False, precisions, dtype, device)
        self.rotary = [rotary]  # a list keeps the shared module out of this module's parameters
        self.attn = Attention(layer_id)

    def qk_norm(self) -> tuple[RMSNorm, RMSNorm] | None:
        """Per-head norms of q and k applied before the rotation (Qwen3), or None."""
        return None

    def project(self, positions: torch.Tensor, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, bool]:
        """q, k, v of the new tokens (rotated) and whether K/V are already stored in the cache."""
        kv_write = self.attn.kv_write()  # None: the attention backend stores the new K/V itself
        q, k, v = self.rotary[0].rotate_qkv(positions, self.qkv_proj(x), self.num_heads, self.num_kv_heads,
                                            self.head_dim, self.qk_norm(), kv_write)
        return q, k, v, kv_write is not None


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, precisions: Sequence[str], dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnLinear(cfg.hidden_size, [inter, inter], False, precisions, dtype, device)
        self.act = GatedAct(cfg.hidden_act)
        self.down_proj = RowLinear(inter, cfg.hidden_size, False, precisions, dtype, device)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x), self.down_proj.input_quant()))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, cfg: ModelConfig, layer_id: int, rotary: RotaryEmbedding, precisions: Sequence[str],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_id, rotary, precisions, dtype, device)
        self.mlp = LlamaMLP(cfg, precisions, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype).to(device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype).to(device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the MLP's output and the residual stream; the next layer's norm adds them.

        Each norm hands the linear after it its input in the form that linear asks for (`input_quant`).
        """
        q, k, v, stored, residual = self.before_attention(positions, x, residual)
        return self.after_attention(self.self_attn.attn(q, k, v, kv_stored=stored), residual)

    # The two halves around attention, the only part of a layer that depends on how the batch's tokens split
    # into sequences (engine/piecewise_graph.py captures everything else per token count).
    def before_attention(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, bool, torch.Tensor]:
        """The input norm (+ the residual add) and the q/k/v projection: (q, k, v, kv_stored, residual)."""
        qkv_quant = self.self_attn.qkv_proj.input_quant()
        if residual is None:
            h, residual = self.input_layernorm(x, qkv_quant), x
        else:
            h, residual = self.input_layernorm.add_norm(x, residual, qkv_quant)
        return *self.self_attn.project(positions, h), residual

    def after_attention(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o_proj, the residual add and norm, the MLP: (MLP output, residual)."""
        h = self.self_attn.o_proj(attn)
        h, residual = self.post_attention_layernorm.add_norm(h, residual, self.mlp.gate_up_proj.input_quant())
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, cfg: ModelConfig, precisions: Sequence[str], dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                      cfg.rope_scaling, device)
        self.layers = nn.ModuleList(
            self.layer_cls(cfg, i, self.rotary, precisions, dtype, device) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype).to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        layer_done = get_forward_context().layer_done
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual)
            if layer_done is not None:
                layer_done(i)
        return self.norm.add_norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel
    # checkpoint projection name -> (our merged module, shard index)
    stacked = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, precisions: Sequence[str], dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.config = cfg
        self.model = self.model_cls(cfg, precisions, dtype, device)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, dtype, device, tied_to=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
