"""Rotary embedding of q and k straight out of the fused qkv projection, with Qwen3's optional per-head
RMSNorm before it, and optionally the new k and v stored straight into the paged KV cache (Triton).

A program takes one token and a block of heads of one part (q, k, or v when the cache is written) as two
[heads, D/2] tiles, so the cos/sin rows and the norm weight are loaded once per block.

Rounded as the eager PyTorch path (`layers/rotary.py`, Hugging Face) is in a 16-bit dtype: the norm as in
`kernels/rmsnorm.py`; cos/sin (float32 tables) cast to the dtype; ``q*cos`` and ``rotate_half(q)*sin``
each rounded, then their sum rounded. The cache gets k and v cast to its dtype, as ``index_copy_`` would.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotated(src, mask, w_ptr, cos_ptr, sin_ptr, eps, HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """Heads at ``src`` ([BLOCK_H, 1] pointers to their first element), normed if HAS_NORM, rotated by the
    cos/sin rows at cos_ptr/sin_ptr -> the two output halves, [BLOCK_H, HALF] each."""
    d = tl.arange(0, HALF)[None, :]
    x1 = tl.load(src + d, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + d, mask=mask, other=0.0)
    dtype = x1.dtype
    if HAS_NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        var = (tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF)
        inv = tl.math.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + d).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
        x1 = (w1 * (f1 * inv).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (f2 * inv).to(dtype).to(tl.float32)).to(dtype)
    cos1 = tl.load(cos_ptr + d).to(dtype).to(tl.float32)
    cos2 = tl.load(cos_ptr + HALF + d).to(dtype).to(tl.float32)
    sin1 = tl.load(sin_ptr + d).to(dtype).to(tl.float32)
    sin2 = tl.load(sin_ptr + HALF + d).to(dtype).to(tl.float32)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = ((a1 * cos1).to(dtype).to(tl.float32) + (-a2 * sin1).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((a2 * cos2).to(dtype).to(tl.float32) + (a1 * sin2).to(dtype).to(tl.float32)).to(dtype)
    return o1, o2


@triton.jit
def _store_halves(dst, o1, o2, mask, HALF: tl.constexpr):
    d = tl.arange(0, HALF)[None, :]
    tl.store(dst + d, o1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + d, o2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_rope_kernel(qkv_ptr, q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr,
                     qw_ptr, kw_ptr, qkv_stride, table_stride, eps, NUM_HEADS: tl.constexpr,
                     NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, Q_BLOCKS: tl.constexpr,
                     KV_BLOCKS: tl.constexpr, HAS_NORM: tl.constexpr, WRITE_K: tl.constexpr, TO_CACHE: tl.constexpr,
                     WRITE_V: tl.constexpr):
    # program (token, block): blocks [0, Q_BLOCKS) are q heads, then KV_BLOCKS of k heads, then (TO_CACHE or
    # WRITE_V) v
    tok = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    hb = tl.arange(0, BLOCK_H)[:, None]
    row = qkv_ptr + tok * qkv_stride
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cos_row, sin_row = cos_ptr + pos * table_stride, sin_ptr + pos * table_stride
    if blk < Q_BLOCKS:
        head = blk * BLOCK_H + hb
        mask = head < NUM_HEADS
        o1, o2 = _rotated(row + head * (2 * HALF), mask, qw_ptr, cos_row, sin_row, eps, HALF, HAS_NORM)
        _store_halves(q_ptr + (tok * NUM_HEADS + head) * (2 * HALF), o1, o2, mask, HALF)
    elif blk < Q_BLOCKS + KV_BLOCKS:
        head = (blk - Q_BLOCKS) * BLOCK_H + hb
        mask = head < NUM_KV_HEADS
        o1, o2 = _rotated(row + (NUM_HEADS + head) * (2 * HALF), mask, kw_ptr, cos_row, sin_row, eps, HALF,
                          HAS_NORM)
        if WRITE_K:
            _store_halves(k_ptr + (tok * NUM_KV_HEADS + head) * (2 * HALF), o1, o2, mask, HALF)
        if TO_CACHE:
            slot = tl.load(slot_ptr + tok)
            _store_halves(k_cache_ptr + (slot * NUM_KV_HEADS + head) * (2 * HALF), o1, o2, mask, HALF)
    elif TO_CACHE or WRITE_V:
        head = (blk - Q_BLOCKS - KV_BLOCKS) * BLOCK_H + hb
        mask = head < NUM_KV_HEADS
        d = tl.arange(0, 2 * HALF)[None, :]
        v = tl.load(row + (NUM_HEADS + NUM_KV_HEADS + head) * (2 * HALF) + d, mask=mask)
        if TO_CACHE:
            slot = tl.load(slot_ptr + tok)
            dst = v_cache_ptr + (slot * NUM_KV_HEADS + head) * (2 * HALF) + d
            tl.store(dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
        if WRITE_V:
            tl.store(v_ptr + (tok * NUM_KV_HEADS + head) * (2 * HALF) + d, v, mask=mask)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, t: int, num_kv_heads: int,
                 head_dim: int, device: torch.device) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3 or c.shape[1:] != (num_kv_heads, head_dim) or not c.is_contiguous() or c.device != device:
            raise ValueError(f"{name} {tuple(c.shape)} is not a contiguous [slots, {num_kv_heads}, {head_dim}] "
                             f"tensor on {device}")
    if slots.shape != (t,) or slots.dtype != torch.int64 or slots.device != device:
        raise ValueError(f"slots must be int64 [{t}] on {device}, got {slots.dtype} {tuple(slots.shape)}")


def qk_norm_rope(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, positions: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None = None,
                 k_weight: torch.Tensor | None = None, eps: float = 0.0, k_cache: torch.Tensor | None = None,
                 v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                 keep_k: bool = True, q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
                 v_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``qkv [T, (H + 2*Hkv) * D]`` -> rotated ``q [T, H, D]`` and ``k [T, Hkv, D]`` (new tensors, or ``q_out``
    and ``k_out`` when given: contiguous, of those shapes; ``v_out`` too gets a contiguous copy of v).

    ``positions [T]`` index the float32 ``cos``/``sin`` tables ``[max_pos, D]``. With ``q_weight`` and
    ``k_weight`` (``[D]`` each) every head is RMS-normalised first (Qwen3). D must be a power of two.
    With ``k_cache``/``v_cache`` (``[num_slots, Hkv, D]``) and ``slots`` (int64 ``[T]``), token i's rotated k
    and its v are also stored in row ``slots[i]`` of the caches; k is then returned only if ``keep_k``.
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
    to_cache = k_cache is not None
    if to_cache != (v_cache is not None) or to_cache != (slots is not None):
        raise ValueError("k_cache, v_cache and slots come together")
    if to_cache:
        _check_cache(k_cache, v_cache, slots, t, num_kv_heads, head_dim, qkv.device)
    elif not keep_k:
        raise ValueError("without a cache to write, k must be kept")
    q = _out(q_out, "q_out", (t, num_heads, head_dim), qkv)
    k = _out(k_out, "k_out", (t, num_kv_heads, head_dim), qkv) if keep_k else None
    v = _out(v_out, "v_out", (t, num_kv_heads, head_dim), qkv) if v_out is not None else None
    if t:
        block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // head_dim))
        q_blocks, kv_blocks = triton.cdiv(num_heads, block_h), triton.cdiv(num_kv_heads, block_h)
        qw, kw = (q_weight, k_weight) if has_norm else (cos, cos)  # unused placeholders without a norm
        v_blocks = kv_blocks if to_cache or v is not None else 0
        _qkv_rope_kernel[(t, q_blocks + kv_blocks + v_blocks)](
            qkv, q, q if k is None else k, q if v is None else v, k_cache if to_cache else q,
            v_cache if to_cache else q, slots if to_cache else positions, positions, cos, sin, qw, kw,
            qkv.stride(0), cos.stride(0), eps, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2,
            BLOCK_H=block_h, Q_BLOCKS=q_blocks, KV_BLOCKS=kv_blocks, HAS_NORM=has_norm, WRITE_K=keep_k,
            TO_CACHE=to_cache, WRITE_V=v is not None, num_warps=max(1, min(8, block_h * head_dim // 256)))
    return q, k


def _out(given: torch.Tensor | None, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """`given` checked to be a contiguous tensor of `shape` in like's dtype and device, or a new one."""
    if given is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(given.shape) != shape or given.dtype != like.dtype or given.device != like.device \
            or not given.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {like.dtype} tensor of shape {shape} on {like.device}, "
                         f"got {given.dtype} {tuple(given.shape)} on {given.device}")
    return given
