"""Rotary embedding of q and k straight out of the fused qkv projection, with Qwen3's optional per-head
RMSNorm before it (Triton, one (token, head) pair per program).

Rounded as the eager PyTorch path (`layers/rotary.py`, Hugging Face) is in a 16-bit dtype: the norm as in
`kernels/rmsnorm.py`; cos/sin (float32 tables) cast to the dtype; ``q*cos`` and ``rotate_half(q)*sin``
each rounded, then their sum rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_rope_kernel(qkv_ptr, q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, qkv_stride, table_stride,
                    eps, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                    HAS_NORM: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    is_q = head < NUM_HEADS
    d = tl.arange(0, HALF)
    src = qkv_ptr + tok * qkv_stride + head * (2 * HALF)
    x1 = tl.load(src + d)
    x2 = tl.load(src + HALF + d)
    dtype = x1.dtype
    if HAS_NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        var = (tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF)
        inv = tl.math.rsqrt(var + eps)
        w_ptr = tl.where(is_q, qw_ptr, kw_ptr)
        w1 = tl.load(w_ptr + d).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
        x1 = (w1 * (f1 * inv).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (f2 * inv).to(dtype).to(tl.float32)).to(dtype)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cos1 = tl.load(cos_ptr + pos * table_stride + d).to(dtype).to(tl.float32)
    cos2 = tl.load(cos_ptr + pos * table_stride + HALF + d).to(dtype).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * table_stride + d).to(dtype).to(tl.float32)
    sin2 = tl.load(sin_ptr + pos * table_stride + HALF + d).to(dtype).to(tl.float32)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = ((a1 * cos1).to(dtype).to(tl.float32) + (-a2 * sin1).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((a2 * cos2).to(dtype).to(tl.float32) + (a1 * sin2).to(dtype).to(tl.float32)).to(dtype)
    if is_q:
        dst = q_ptr + (tok * NUM_HEADS + head) * (2 * HALF)
    else:
        dst = k_ptr + (tok * NUM_KV_HEADS + (head - NUM_HEADS)) * (2 * HALF)
    tl.store(dst + d, o1)
    tl.store(dst + HALF + d, o2)


def qk_norm_rope(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, positions: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None = None,
                 k_weight: torch.Tensor | None = None, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``qkv [T, (H + 2*Hkv) * D]`` -> rotated ``q [T, H, D]`` and ``k [T, Hkv, D]`` (new tensors).

    ``positions [T]`` index the float32 ``cos``/``sin`` tables ``[max_pos, D]``. With ``q_weight`` and
    ``k_weight`` (``[D]`` each) every head is RMS-normalised first (Qwen3). D must be a power of two.
    """
    t = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not a row-major [T, (H+2Hkv)*D] tensor")
    if head_dim & (head_dim - 1) or head_dim < 4:
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if positions.shape != (t,):
        raise ValueError(f"positions {tuple(positions.shape)} do not match {t} tokens")
    if cos.shape != sin.shape or cos.shape[-1] != head_dim or cos.dtype != torch.float32 or cos.stride(1) != 1:
        raise ValueError("cos/sin must be float32 [max_pos, head_dim] tables")
    has_norm = q_weight is not None
    if has_norm != (k_weight is not None):
        raise ValueError("q_weight and k_weight come together")
    if has_norm and (q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,)):
        raise ValueError("q/k norm weights must be [head_dim]")
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(t, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        qw, kw = (q_weight, k_weight) if has_norm else (cos, cos)  # unused placeholders without a norm
        _qk_rope_kernel[(t, num_heads + num_kv_heads)](
            qkv, q, k, positions, cos, sin, qw, kw, qkv.stride(0), cos.stride(0), eps, NUM_HEADS=num_heads,
            NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2, HAS_NORM=has_norm, num_warps=1)
    return q, k
