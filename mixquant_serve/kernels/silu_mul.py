"""SiLU-and-multiply over a merged gate_up projection (Triton): ``silu(gate) * up``.

``x [..., 2*I]`` holds gate in its first half and up in its second. Rounded as PyTorch's eager
``F.silu(gate) * up`` is in a 16-bit dtype: silu in float32 rounded to the dtype, then the product
rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, x_stride, out_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    y = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2*I]`` -> ``[..., I]``; the last dimension must be contiguous."""
    if x.shape[-1] % 2:
        raise ValueError(f"gate_up needs an even last dimension, got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    out = torch.empty(rows.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if rows.shape[0]:
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](rows, out, inter, rows.stride(0),
                                                                      out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], inter)
