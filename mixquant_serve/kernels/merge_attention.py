"""Merge attention computed over disjoint key slices: per (row, head), S partial outputs (each normalized
over its slice) and their base-2 log-sum-exps -> the attention over all keys.

Used by the split-KV decode and extend kernels. A slice without keys has lse -inf and weighs nothing;
a row whose slices are all empty (a padding row) gets zeros. The split count is a run-time argument; splits
are merged up to 32 a step (compiled per power of two up to 32), so any count keeps its partials in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_S = 32  # [32, head_dim] float32 partials a step


@triton.jit
def _merge_kernel(
    PartO, PartLse, Out, stride_or, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # rows x heads x splits x head_dim may pass 2**31 (long extends)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    first = (r * tl.num_programs(1) + h) * num_splits
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        m = tl.maximum(m, tl.load(PartLse + first + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf")))
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        part = first + s0 + offs_s
        s_mask = s0 + offs_s < num_splits
        w = tl.exp2(tl.load(PartLse + part, mask=s_mask, other=float("-inf")) - m_all)
        sd_mask = s_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        w_sum += w
        acc += w[:, None] * tl.load(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], mask=sd_mask, other=0.0)
    denom = tl.sum(w_sum, 0)
    o = tl.sum(acc, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + r * stride_or + h * stride_oh + offs_d, o.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


def merge_attention(part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """part_o float32 [R, H, S, D], part_lse float32 [R, H, S] (base 2) -> out [R, H, D] (any float dtype)."""
    r, h, s, d = part_o.shape
    if part_o.dtype != torch.float32 or part_lse.dtype != torch.float32 or tuple(part_lse.shape) != (r, h, s):
        raise ValueError(f"want float32 part_o [R, H, S, D] and part_lse [R, H, S], got {part_o.dtype} "
                         f"{tuple(part_o.shape)}, {part_lse.dtype} {tuple(part_lse.shape)}")
    if not (part_o.is_contiguous() and part_lse.is_contiguous()) or out.shape != (r, h, d) or out.stride(-1) != 1:
        raise ValueError(f"want contiguous partials and out [{r}, {h}, {d}] with a contiguous last dim")
    if r:
        block_d = triton.next_power_of_2(d)
        _merge_kernel[(r, h)](part_o, part_lse, out, out.stride(0), out.stride(1), s, HEAD_DIM=d,
                              BLOCK_S=min(triton.next_power_of_2(s), _MAX_BLOCK_S), BLOCK_D=block_d,
                              num_warps=4 if block_d >= 128 else 2)
    return out
