"""Rotary position embedding (rotate-half convention of Llama/Qwen), with Llama-3 and linear scaling.

`rotate_qkv` takes the fused qkv projection: on CUDA one Triton kernel (`kernels/rotary.py`) applies the
optional per-head q/k RMSNorm (Qwen3) and the rotation, and stores K/V into the paged cache when the
attention backend asks for that (a `KVWrite`); elsewhere PyTorch ops do the same arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mixquant_serve.config import ConfigError
from mixquant_serve.layers.attention.base import KVWrite
from mixquant_serve.layers.norm import RMSNorm


def _inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        return _llama3(inv, scaling)
    raise ConfigError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def _llama3(inv: torch.Tensor, s: Mapping[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables in float32 for every position, cast to the activations' dtype when applied."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: Mapping[str, Any] | None, device: torch.device | str) -> None:
        super().__init__()
        inv = _inv_freq(head_dim, theta, scaling)
        pos = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(pos, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q: [T, H, D], k: [T, Hkv, D], positions: [T]."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def rotate_qkv(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int, qk_norm: tuple[RMSNorm, RMSNorm] | None = None, kv_write: KVWrite | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``qkv [T, (H + 2*Hkv) * D]`` -> ``q [T, H, D]``, ``k [T, Hkv, D]`` rotated (normed first if
        ``qk_norm``), and ``v [T, Hkv, D]``. With ``kv_write`` k and v are also stored in its cache rows, and k
        comes back only if ``kv_write.keep_k`` (else None); q, k and v land in its ``q_out``/``k_out``/``v_out``
        where it names them."""
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        v = qkv[:, q_size + kv_size :].view(-1, num_kv_heads, head_dim)
        if qkv.is_cuda:
            from mixquant_serve.kernels.rotary import qk_norm_rope

            qw, kw, eps = (qk_norm[0].weight, qk_norm[1].weight, qk_norm[0].eps) if qk_norm else (None, None, 0.0)
            cache = dict(k_cache=kv_write.k_cache, v_cache=kv_write.v_cache, slots=kv_write.slots,
                         keep_k=kv_write.keep_k, q_out=kv_write.q_out, k_out=kv_write.k_out,
                         v_out=kv_write.v_out) if kv_write else {}
            q, k = qk_norm_rope(qkv, num_heads, num_kv_heads, head_dim, positions, self.cos, self.sin, qw, kw, eps,
                                **cache)
            return q, k, v if kv_write is None or kv_write.v_out is None else kv_write.v_out
        q = qkv[:, :q_size].view(-1, num_heads, head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(-1, num_kv_heads, head_dim)
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        q, k = self(positions, q, k)
        if kv_write is None:
            return q, k, v
        kv_write.k_cache.index_copy_(0, kv_write.slots, k.to(kv_write.k_cache.dtype))
        kv_write.v_cache.index_copy_(0, kv_write.slots, v.to(kv_write.v_cache.dtype))
        q, k, v = (x if out is None else out.copy_(x) for x, out in
                   ((q, kv_write.q_out), (k, kv_write.k_out), (v, kv_write.v_out)))
        return q, k if kv_write.keep_k else None, v


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
