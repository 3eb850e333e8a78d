"""Paged decode attention (one new query token per sequence), split over the KV length.

Program (b, kv_head, split) attends all G = H / Hkv query heads of one KV head over one slice of the
sequence's keys, so each KV page is read once; it writes a float32 partial output and its log-sum-exp
(base 2), and merge_attention combines the splits. The split count is a launch parameter (the grid's third
dimension, not a compile-time constant: the graphs of all batch sizes share two compiled kernels, one split
or several) that does not depend on the sequence lengths (each split takes ceil(seq_len / num_splits) keys,
rounded up to whole key blocks, computed in the kernel), so one launch can be captured in a CUDA graph and
replayed with other lengths. A row with seq_len 0 (a padding row) gets zeros. Launch fields and the split
policy: kernels/tuning.py's "decode_attention" entry (MIXQUANT_KERNEL_CONFIGS overrides it per GPU).
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.merge_attention import merge_attention
from mixquant_serve.kernels.tuning import ENV, config

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config() -> dict[str, int]:
    """The "decode_attention" launch fields, checked once per override text (asked for every layer)."""
    return _checked(os.environ.get(ENV, ""))


@cache
def _checked(text: str) -> dict[str, int]:
    cfg = config("decode_attention")
    if cfg["split_cap"] < 1 or cfg["programs_per_sm"] < 1:
        raise ValueError(f"decode_attention: split_cap and programs_per_sm must be >= 1, got {cfg} "
                         f"(kernels/tuning.py, {ENV})")
    _check_launch(cfg["block_n"], cfg["num_warps"], cfg["num_stages"])
    _check_launch(cfg["split_block_n"] or cfg["block_n"], cfg["num_warps"], cfg["split_num_stages"] or 1)
    return cfg


def _check_launch(block_n: int, num_warps: int, num_stages: int) -> None:
    if block_n < 16 or block_n & (block_n - 1) or not 1 <= num_warps <= 32 or num_warps & (num_warps - 1) \
            or num_stages < 1:
        raise ValueError(f"decode_attention: block_n must be a power of two >= 16, num_warps a power of two up to "
                         f"32 and num_stages >= 1, got {block_n}, {num_warps}, {num_stages} (kernels/tuning.py, {ENV})")


def default_num_splits(batch: int, num_kv_heads: int, num_sms: int = 132) -> int:
    """Enough (batch, kv_head, split) programs for about programs_per_sm per SM, at most split_cap splits
    (kernels/tuning.py; by default twice the SMs, at most 32)."""
    cfg = _config()
    programs = max(batch * num_kv_heads, 1)
    return max(1, min(cfg["split_cap"], triton.cdiv(cfg["programs_per_sm"] * num_sms, programs)))


@triton.jit
def _decode_split_kernel(
    Q, K, V, PageTable, SeqLens, Out, PartO, PartLse,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pt, stride_ob, stride_oh,
    sm_scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(SeqLens + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * G + offs_g
    gd_mask = (offs_g < G)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        page = tl.load(PageTable + b * stride_pt + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE
        nd_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=nd_mask, other=0.0)
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :], mask=nd_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split (or row) gives zeros, never NaN
    if not SPLIT:
        out_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=gd_mask)
    else:
        row = (b * G * tl.num_programs(1) + heads) * num_splits + split  # PartLse [B, H, S], PartO [B, H, S, D]
        tl.store(PartO + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=gd_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + row, lse, mask=offs_g < G)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
           seq_lens: torch.Tensor, out: torch.Tensor | None) -> None:
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"want q [B, H, D] and k/v caches [S, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    (b, h, d), hkv = q.shape, k_cache.shape[1]
    if k_cache.shape[2] != d or h % hkv:
        raise ValueError(f"head_dim {k_cache.shape[2]} vs {d}, or {h} query heads not a multiple of {hkv}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q/k/v must share one of {_DTYPES}, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if page_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise TypeError(f"page_table and seq_lens must be int32, got {page_table.dtype}, {seq_lens.dtype}")
    if page_table.dim() != 2 or page_table.shape[0] != b or tuple(seq_lens.shape) != (b,):
        raise ValueError(f"want page_table [{b}, P] and seq_lens [{b}], got {tuple(page_table.shape)}, "
                         f"{tuple(seq_lens.shape)}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    tensors = (q, k_cache, v_cache, page_table, seq_lens) + ((out,) if out is not None else ())
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or page_table.stride(-1) != 1:
        raise ValueError("q, k/v caches and page_table need a contiguous last dim")
    if not seq_lens.is_contiguous():
        raise ValueError("seq_lens must be contiguous")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, page_size: int, scale: float, num_splits: int,
                     out: torch.Tensor | None = None, *, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None) -> torch.Tensor:
    """q [B, H, D] attends to keys 0..seq_lens[b]-1 of row b, read through page_table [B, P] from the
    caches [num_slots, Hkv, D] (slot = page * page_size + pos % page_size) -> out [B, H, D] in q's dtype.
    Launch fields left None come from kernels/tuning.py."""
    _check(q, k_cache, v_cache, page_table, seq_lens, out)
    if num_splits < 1 or page_size < 1:
        raise ValueError(f"num_splits and page_size must be >= 1, got {num_splits}, {page_size}")
    cfg = _config()
    split = num_splits > 1
    bn, st = ("split_block_n" if split and cfg["split_block_n"] else "block_n",
              "split_num_stages" if split and cfg["split_num_stages"] else "num_stages")
    block_n, num_warps, num_stages = (cfg[name] if given is None else given for name, given in
                                      ((bn, block_n), ("num_warps", num_warps), (st, num_stages)))
    _check_launch(block_n, num_warps, num_stages)
    (b, h, d), hkv = q.shape, k_cache.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if b == 0:
        return out
    g = h // hkv
    block_d = triton.next_power_of_2(d)
    part_o = part_lse = out  # unused placeholders when one split writes out directly
    if num_splits > 1:
        part_o = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, out, part_o, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        page_table.stride(0), out.stride(0), out.stride(1), scale * _LOG2E,
        G=g, HEAD_DIM=d, PAGE_SIZE=page_size, SPLIT=num_splits > 1, BLOCK_G=max(16, triton.next_power_of_2(g)),
        BLOCK_N=block_n, BLOCK_D=block_d, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        merge_attention(part_o, part_lse, out)
    return out
