"""RMSNorm with an optional fused residual add, one row per program (Triton).

Numerics follow Hugging Face's (and `layers/norm.py`'s): with a residual, ``s = bf16(x + residual)`` is
formed first and written back as the new residual; then float32 statistics over ``s``,
``normed = (s * rsqrt(mean(s**2) + eps))`` rounded to the input dtype, and finally ``weight * normed``
rounded again. Rows of any length up to 64k elements; the last dimension must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, out_ptr, res_out_ptr, w_ptr, n_cols, x_stride, res_stride, out_stride,
                    eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * out_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def _rows(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    if t.shape[-1] != n:
        raise ValueError(f"{name} has last dimension {t.shape[-1]}, want {n}")
    rows = t.reshape(-1, n)
    if rows.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    return rows


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight * norm(x + residual), x + residual)``; the second item is None without a residual.

    ``x [..., N]`` and ``residual`` (same shape and dtype) are not modified; the outputs are new tensors.
    """
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit rows of {n}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    if weight.device != x.device or (residual is not None and residual.device != x.device):
        raise ValueError("x, weight and residual must be on one device")
    rows = _rows(x, "x", n)
    res = _rows(residual, "residual", n) if residual is not None else rows
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    block = triton.next_power_of_2(n)
    if rows.shape[0]:
        _rmsnorm_kernel[(rows.shape[0],)](rows, res, out, res_out, weight, n, rows.stride(0), res.stride(0),
                                          out.stride(0), eps, HAS_RES=residual is not None, BLOCK=block,
                                          num_warps=min(16, max(1, block // 256)))
    out = out.view(x.shape)
    return out, (res_out.view(x.shape) if residual is not None else None)
