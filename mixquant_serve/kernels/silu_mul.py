"""SiLU-and-multiply over a merged gate_up projection (Triton): ``silu(gate) * up``.

``x [..., 2*I]`` holds gate in its first half and up in its second. Rounded as PyTorch's eager
``F.silu(gate) * up`` is in a 16-bit dtype: silu in float32 rounded to the dtype, then the product
rounded again.

``silu_mul_fp8`` quantizes that rounded product per token to FP8 in the same kernel, with ``fp8_quant.py``'s
epilogue: the bits of ``fp8_quantize_per_token(silu_mul(x))``. It needs the whole row of a program, so it
runs one program per row (``silu_mul`` splits a row into blocks of up to 1024).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.fp8_quant import MIN_AMAX, check_triton_device, hardware_cast, quantize_row_store


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, s_ptr, inter, x_stride, BLOCK: tl.constexpr, FP8: tl.constexpr,
                     MIN_AMAX: tl.constexpr, HW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    y = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    out_off = row * inter + cols  # out is contiguous [T, inter]: y, or its FP8 codes
    if FP8:  # one program holds the whole row (program_id(1) == 0)
        quantize_row_store(y.to(tl.float32), out_ptr + out_off, s_ptr + row, mask, BLOCK, MIN_AMAX, HW)
    else:
        tl.store(out_ptr + out_off, y, mask=mask)


def _gate_up_rows(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"gate_up needs an even last dimension, got {x.shape[-1]}")
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    check_triton_device(x)
    return rows


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2*I]`` -> ``[..., I]``; the last dimension must be contiguous."""
    rows = _gate_up_rows(x)
    inter = x.shape[-1] // 2
    out = torch.empty(rows.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if rows.shape[0]:
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
            rows, out, out, inter, rows.stride(0), BLOCK=block, FP8=False, MIN_AMAX=MIN_AMAX,
            HW=hardware_cast(x), num_warps=4)
    return out.view(*x.shape[:-1], inter)


def silu_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., 2*I]`` -> ``(x_fp8 [..., I] float8_e4m3fn, scale [..., 1] float32)``, per token.

    The bits of ``fp8_quantize_per_token(silu_mul(x))``; the last dimension must be contiguous.
    """
    rows = _gate_up_rows(x)
    inter = x.shape[-1] // 2
    q = torch.empty(rows.shape[0], inter, dtype=torch.uint8, device=x.device)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(inter)
    if rows.shape[0]:
        _silu_mul_kernel[(rows.shape[0], 1)](rows, q, scale, inter, rows.stride(0), BLOCK=block, FP8=True,
                                             MIN_AMAX=MIN_AMAX, HW=hardware_cast(x),
                                             num_warps=min(16, max(1, block // 256)))
    lead = x.shape[:-1]
    return q.view(torch.float8_e4m3fn).view(*lead, inter), scale.view(*lead, 1)
