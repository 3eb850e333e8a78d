"""Paged extend (prefill) attention over a ragged batch: each sequence has a cached prefix plus new tokens.

The new tokens' K/V are already in the cache, so every key is read through the page table. Query
token i of sequence b sits at position prefix_lens[b] + i and sees keys 0..that position (causal within
the new tokens). Program (head, query block, b) runs a flash-attention online softmax in float32: first
over the keys that every query of its block sees (no mask), then over the block's own diagonal. With
num_splits > 1 the unmasked keys are shared out among that many programs per query block (the last one
also takes the diagonal) and merge_attention combines their partial results: for a few new tokens after
a long cached prefix, which would otherwise leave most of the GPU idle.
Grouped (GQA, for few new tokens per sequence, e.g. Mix-Quant's BF16 tail after a long prompt): a program takes
one KV head and a block of BLOCK_M // G new tokens with all G query heads of that KV head as its BLOCK_M rows, so
each key block it loads serves G heads (and G times fewer programs share out the prefix, in more splits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.merge_attention import merge_attention

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attend(acc, l_i, m_i, q, q_pos, K, V, page_row, kvh, n0, limit, stride_ks, stride_kh, stride_vs,
            stride_vh, sm_scale_log2, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """One block of keys n0..n0+BLOCK_N-1 (those < limit) folded into the running softmax state."""
    offs_d = tl.arange(0, BLOCK_D)
    pos = n0 + tl.arange(0, BLOCK_N)
    n_mask = pos < limit
    page = tl.load(page_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    slot = page * PAGE_SIZE + pos % PAGE_SIZE
    nd_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=nd_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
    visible = n_mask[None, :]
    if CAUSAL:
        visible = visible & (pos[None, :] <= q_pos[:, None])
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :], mask=nd_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _extend_kernel(
    Q, K, V, Out, PartO, PartLse, PageTable, QStartLoc, PrefixLens,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh, stride_pt,
    sm_scale_log2, NUM_SPLITS,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr, GROUPED: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # NUM_SPLITS is a run-time value (SPLIT: whether it exceeds 1), so its many values share one compiled kernel
    # program_id(0): a query head (heads sharing a KV head run next to each other: their K/V stay in L2), or
    # GROUPED a KV head whose G query heads are the rows of the block
    mb = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest (last) query blocks start first
    b = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(QStartLoc + b)
    q_len = tl.load(QStartLoc + b + 1) - q_start
    m0 = mb * TOKENS  # TOKENS: new tokens a block covers (BLOCK_M, or BLOCK_M // G grouped)
    if m0 >= q_len:
        return
    prefix = tl.load(PrefixLens + b)
    rows = tl.arange(0, BLOCK_M)
    if GROUPED:
        kvh = tl.program_id(0)
        num_heads = tl.num_programs(0) * G
        offs_m = m0 + rows // G  # row r: token m0 + r // G, head kvh * G + r % G
        head = kvh * G + rows % G
    else:
        kvh = tl.program_id(0) // G
        num_heads = tl.num_programs(0)
        offs_m = m0 + rows
        head = tl.program_id(0) + rows * 0
    offs_d = tl.arange(0, BLOCK_D)
    md_mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=md_mask,
                other=0.0)
    q_pos = prefix + offs_m
    page_row = PageTable + b.to(tl.int64) * stride_pt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = prefix + m0  # keys every query of this block sees, shared out among the splits
    chunk = tl.cdiv(tl.cdiv(full_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, full_end)
    for n0 in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_pos, K, V, page_row, kvh, n0, hi, stride_ks, stride_kh,
                                stride_vs, stride_vh, sm_scale_log2, False, HEAD_DIM, PAGE_SIZE, BLOCK_N, BLOCK_D,
                                DOT_PREC)
    diag_end = prefix + tl.minimum(m0 + TOKENS, q_len)
    diag_start = tl.where(split == NUM_SPLITS - 1, full_end, diag_end)  # the last split takes the diagonal
    for n0 in range(diag_start, diag_end, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_pos, K, V, page_row, kvh, n0, diag_end, stride_ks, stride_kh,
                                stride_vs, stride_vh, sm_scale_log2, True, HEAD_DIM, PAGE_SIZE, BLOCK_N, BLOCK_D,
                                DOT_PREC)
    if not SPLIT:
        o = acc / l_i[:, None]  # every query sees at least its own key, so l_i > 0
        tl.store(Out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(Out.dtype.element_ty), mask=md_mask)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a split may have no keys
        part = (q_rows * num_heads + head) * NUM_SPLITS + split  # PartLse [T, H, S], PartO [T, H, S, D]
        tl.store(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=md_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + part, lse, mask=offs_m < q_len)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
           q_start_loc: torch.Tensor, prefix_lens: torch.Tensor, seq_lens: torch.Tensor,
           out: torch.Tensor | None) -> None:
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"want q [T, H, D] and k/v caches [S, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    h, d, hkv = q.shape[1], q.shape[2], k_cache.shape[1]
    if k_cache.shape[2] != d or h % hkv:
        raise ValueError(f"head_dim {k_cache.shape[2]} vs {d}, or {h} query heads not a multiple of {hkv}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q/k/v must share one of {_DTYPES}, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    ints = (page_table, q_start_loc, prefix_lens, seq_lens)
    if any(t.dtype != torch.int32 for t in ints):
        raise TypeError(f"page_table, q_start_loc, prefix_lens, seq_lens must be int32, got {[t.dtype for t in ints]}")
    b = page_table.shape[0]
    if page_table.dim() != 2 or tuple(q_start_loc.shape) != (b + 1,) or tuple(prefix_lens.shape) != (b,) \
            or tuple(seq_lens.shape) != (b,):
        raise ValueError(f"want page_table [B, P], q_start_loc [B+1], prefix_lens/seq_lens [B], got "
                         f"{[tuple(t.shape) for t in ints]}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    tensors = (q, k_cache, v_cache, *ints) + ((out,) if out is not None else ())
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or page_table.stride(-1) != 1:
        raise ValueError("q, k/v caches and page_table need a contiguous last dim")
    if not (q_start_loc.is_contiguous() and prefix_lens.is_contiguous()):
        raise ValueError("q_start_loc and prefix_lens must be contiguous")


def default_block_m(max_q_len: int) -> int:
    """64 query rows a program, fewer (16 or 32) when no sequence has more new tokens."""
    return min(64, max(16, triton.next_power_of_2(max_q_len)))


def default_extend_splits(num_heads: int, batch: int, max_q_len: int, max_prefix: int, num_sms: int = 132,
                          cap: int = 16) -> int:
    """KV splits for a launch too small to fill the GPU twice over a long cached prefix (a short turn after
    a long conversation); at least 512 prefix keys a split."""
    programs = num_heads * batch * triton.cdiv(max(max_q_len, 1), default_block_m(max_q_len))
    return max(1, min(cap, triton.cdiv(2 * num_sms, programs), max_prefix // 512))


def grouped_block_m(num_heads: int, num_kv_heads: int, max_q_len: int) -> int | None:
    """BLOCK_M of the grouped launch when it applies: G = heads per KV head a power of two from 2, and every
    sequence's new tokens times G fit in at most 64 rows (a few new tokens: Mix-Quant's tail, a short turn);
    else None."""
    g = num_heads // max(num_kv_heads, 1)
    if g < 2 or g & (g - 1) or max_q_len * g > 64:
        return None
    return max(16, triton.next_power_of_2(max(max_q_len, 1) * g))


def default_grouped_splits(num_kv_heads: int, batch: int, max_prefix: int, num_sms: int = 132, cap: int = 32) -> int:
    """KV splits of a grouped launch (one query block per sequence and KV head): enough programs to fill the GPU
    twice, at least 128 prefix keys a split."""
    return max(1, min(cap, triton.cdiv(2 * num_sms, num_kv_heads * batch), max_prefix // 128))


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                     q_start_loc: torch.Tensor, prefix_lens: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     scale: float, max_q_len: int, out: torch.Tensor | None = None, *, num_splits: int = 1,
                     block_m: int | None = None, block_n: int = 64, num_warps: int = 4,
                     num_stages: int = 2, grouped: bool = False) -> torch.Tensor:
    """q [T, H, D] (sequence b's new tokens are rows q_start_loc[b]..q_start_loc[b+1]-1, at positions
    prefix_lens[b].., seq_lens = prefix_lens + new) attends causally to its sequence's keys, read through
    page_table [B, P] from the caches [num_slots, Hkv, D] -> out [T, H, D] in q's dtype.
    max_q_len must be >= every sequence's new-token count (it sizes the grid). num_splits > 1 shares each
    query block's prefix keys among that many programs (float32 partials, then merge_attention). grouped: one
    program per KV head whose BLOCK_M rows are block_m // G tokens x G heads (block_m a multiple of G = H / Hkv)."""
    _check(q, k_cache, v_cache, page_table, q_start_loc, prefix_lens, seq_lens, out)
    if page_size < 1 or max_q_len < 0 or num_splits < 1:
        raise ValueError(f"page_size and num_splits must be >= 1 and max_q_len >= 0, got {page_size}, "
                         f"{num_splits}, {max_q_len}")
    (t, h, d), hkv, b = q.shape, k_cache.shape[1], page_table.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if t == 0 or b == 0 or max_q_len == 0:
        return out
    part_o = part_lse = out  # unused placeholders when one split writes out directly
    if num_splits > 1:  # rows no program writes (tokens past a sequence's q_len) are never merged into out
        part_o = torch.empty(t, h, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(t, h, num_splits, dtype=torch.float32, device=q.device)
    g = h // hkv
    if grouped:
        block_m = block_m or grouped_block_m(h, hkv, max_q_len) or 64
        if block_m % g:
            raise ValueError(f"a grouped launch needs block_m ({block_m}) to be a multiple of G = {g}")
        grid = (hkv, triton.cdiv(max_q_len, block_m // g), b * num_splits)
    else:
        block_m = block_m or default_block_m(max_q_len)
        grid = (h, triton.cdiv(max_q_len, block_m), b * num_splits)
    _extend_kernel[grid](
        q, k_cache, v_cache, out, part_o, part_lse, page_table, q_start_loc, prefix_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), page_table.stride(0), scale * _LOG2E, num_splits,
        G=g, HEAD_DIM=d, PAGE_SIZE=page_size, SPLIT=num_splits > 1, GROUPED=grouped,
        TOKENS=block_m // g if grouped else block_m, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d), DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        merge_attention(part_o, part_lse, out)
    return out
