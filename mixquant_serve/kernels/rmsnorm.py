"""RMSNorm with an optional fused residual add, one row per program (Triton).

Numerics follow Hugging Face's (and `layers/norm.py`'s): with a residual, ``s = bf16(x + residual)`` is
formed first and written back as the new residual; then float32 statistics over ``s``,
``normed = (s * rsqrt(mean(s**2) + eps))`` rounded to the input dtype, and finally ``weight * normed``
rounded again. Rows of any length up to 64k elements; the last dimension must be contiguous.

``rmsnorm_fp8`` quantizes that rounded output per token to FP8 in the same kernel, with
``fp8_quant.py``'s epilogue: the bits of ``fp8_quantize_per_token(rmsnorm(...)[0])`` without writing and
reading back the 16-bit tensor. ``rmsnorm_nvfp4`` likewise quantizes and dequantizes it to NVFP4 with the
row's dynamic power-of-two scale folded in (``nvfp4_quant.py``'s epilogue): the bits of
``nvfp4_quantize_dequantize(rmsnorm(...)[0], fold_global=True)``, the operand of the cuBLAS NVFP4 GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.fp8_quant import MIN_AMAX, check_triton_device, hardware_cast, nan_amax, quantize_row_store
from mixquant_serve.kernels.nvfp4_quant import AMAX_FLOOR, BLOCK_SIZE, qdq_fold_store, row_pow2_scale
from mixquant_serve.kernels.tuning import config

_QUANT = {None: 0, "fp8": 1, "nvfp4": 2}  # what the kernel writes: the norm, FP8 codes, NVFP4 operand


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, out_ptr, res_out_ptr, w_ptr, s_ptr, n_cols, x_stride, res_stride, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr, MIN_AMAX: tl.constexpr,
                    AMAX_FLOOR: tl.constexpr, HW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    out_off = row * n_cols + cols  # out (y, its FP8 codes or NVFP4 operand) and res_out: contiguous [T, n_cols]
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + out_off, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
    if QUANT == 1:
        quantize_row_store(y.to(tl.float32), out_ptr + out_off, s_ptr + row, mask, BLOCK, MIN_AMAX, HW)
    elif QUANT == 2:
        yf = y.to(tl.float32)
        gs = row_pow2_scale(nan_amax(yf), s_ptr + row, AMAX_FLOOR)
        qdq_fold_store(yf, gs, out_ptr + row * n_cols, 0, n_cols, BLOCK // 16, HW)
    else:
        tl.store(out_ptr + out_off, y, mask=mask)


def _rows(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    if t.shape[-1] != n:
        raise ValueError(f"{name} has last dimension {t.shape[-1]}, want {n}")
    rows = t.reshape(-1, n)
    if rows.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    return rows


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit rows of {n}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    if weight.device != x.device or (residual is not None and residual.device != x.device):
        raise ValueError("x, weight and residual must be on one device")
    check_triton_device(x)


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
            quant: str | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(out [T, N], res_out [T, N] or None, scale [T, 1] or None)``; with "fp8" out holds the codes (uint8),
    with "nvfp4" the folded NVFP4 operand (x's dtype) and scale the rows' power-of-two scales."""
    _check(x, weight, residual)
    n = x.shape[-1]
    if quant == "nvfp4" and n % BLOCK_SIZE:
        raise ValueError(f"NVFP4 needs rows of a multiple of {BLOCK_SIZE}, got {n}")
    rows = _rows(x, "x", n)
    res = _rows(residual, "residual", n) if residual is not None else rows
    t = rows.shape[0]
    out = torch.empty(t, n, dtype=torch.uint8 if quant == "fp8" else x.dtype, device=x.device)
    res_out = torch.empty(t, n, dtype=x.dtype, device=x.device) if residual is not None else None
    scale = torch.empty(t, 1, dtype=torch.float32, device=x.device) if quant else None
    block = max(16, triton.next_power_of_2(n))
    if t:  # unused pointers get `out`
        _rmsnorm_kernel[(t,)](rows, res, out, out if res_out is None else res_out, weight,
                              out if scale is None else scale, n, rows.stride(0), res.stride(0), eps,
                              HAS_RES=residual is not None, BLOCK=block, QUANT=_QUANT[quant], MIN_AMAX=MIN_AMAX,
                              AMAX_FLOOR=AMAX_FLOOR, HW=hardware_cast(x),
                              num_warps=min(config("rmsnorm")["max_warps"], max(1, block // 256)))
    return out, res_out, scale


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight * norm(x + residual), x + residual)``; the second item is None without a residual.

    ``x [..., N]`` and ``residual`` (same shape and dtype) are not modified; the outputs are new tensors.
    """
    out, res_out, _ = _launch(x, weight, eps, residual, None)
    return out.view(x.shape), (res_out.view(x.shape) if res_out is not None else None)


def rmsnorm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``rmsnorm`` quantized per token: ``(x_fp8 [..., N] float8_e4m3fn, scale [..., 1] float32, residual)``.

    The codes and scales are those of ``fp8_quantize_per_token`` on ``rmsnorm``'s output, bit for bit;
    the residual is as ``rmsnorm`` returns it.
    """
    q, res_out, scale = _launch(x, weight, eps, residual, "fp8")
    lead = x.shape[:-1]
    return (q.view(torch.float8_e4m3fn).view(x.shape), scale.view(*lead, 1),
            res_out.view(x.shape) if res_out is not None else None)


def rmsnorm_nvfp4(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``rmsnorm`` quantized and dequantized to NVFP4 per token, the dynamic power-of-two scale folded in:
    ``(operand [..., N] x.dtype, scale [..., 1] float32, residual)``, the bits of
    ``nvfp4_quantize_dequantize(rmsnorm(...)[0], fold_global=True)``; N a multiple of 16."""
    out, res_out, scale = _launch(x, weight, eps, residual, "nvfp4")
    return out.view(x.shape), scale.view(*x.shape[:-1], 1), res_out.view(x.shape) if res_out is not None else None
