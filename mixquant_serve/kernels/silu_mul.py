"""SiLU-and-multiply over a merged gate_up projection (Triton): ``silu(gate) * up``.

``x [..., 2*I]`` holds gate in its first half and up in its second. Rounded as PyTorch's eager
``F.silu(gate) * up`` is in a 16-bit dtype: silu in float32 rounded to the dtype, then the product
rounded again.

``silu_mul_fp8`` quantizes that rounded product per token to FP8 in the same kernel, with ``fp8_quant.py``'s
epilogue: the bits of ``fp8_quantize_per_token(silu_mul(x))``. It needs the row's amax before any code, so a
program takes a whole row: in chunks (``kernels/tuning.py``'s "silu_mul_fp8" block), twice, or, with a block
that covers the row, once with the row held in registers (``silu_mul`` splits a row into blocks of up to 1024
over programs).
``silu_mul_nvfp4`` does the same with ``nvfp4_quant.py``'s epilogue: the NVFP4 operand, scale folded in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.fp8_quant import (
    MIN_AMAX,
    amax_scale,
    check_triton_device,
    hardware_cast,
    nan_amax,
    quantize_row_store,
    quantize_store,
)
from mixquant_serve.kernels.nvfp4_quant import AMAX_FLOOR, BLOCK_SIZE, qdq_fold_store, row_pow2_scale
from mixquant_serve.kernels.tuning import config

FUSED_CHUNK = 2048  # columns per step of the fused NVFP4 kernel


@triton.jit
def _silu_mul_chunk(x_ptr, row_off, inter, k0, BLOCK: tl.constexpr):
    """``silu(gate) * up`` of columns k0..k0+BLOCK-1 of a row, rounded as eager PyTorch; 0 past the row."""
    cols = k0 + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row_off + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row_off + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), cols, mask


@triton.jit
def _silu_mul_row_amax(x_ptr, row_off, inter, BLOCK: tl.constexpr):
    """``nan_amax`` of a row's ``silu(gate) * up`` (as rounded), computed BLOCK columns at a time."""
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, inter, BLOCK):
        y, _, _ = _silu_mul_chunk(x_ptr, row_off, inter, k0, BLOCK)
        y = y.to(tl.float32)
        # elementwise running max that keeps a NaN once seen (tl.maximum may drop it)
        amax = tl.where((y != y) | (amax != amax), float("nan"), tl.maximum(amax, tl.abs(y)))
    return nan_amax(amax)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, x_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y, cols, mask = _silu_mul_chunk(x_ptr, row * x_stride, inter, tl.program_id(1) * BLOCK, BLOCK)
    tl.store(out_ptr + row * inter + cols, y, mask=mask)


@triton.jit
def _silu_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, inter, x_stride, BLOCK: tl.constexpr, MIN_AMAX: tl.constexpr,
                         HW: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """One row per program, in chunks: the row's amax, then the chunks again (recomputed from gate_up, which
    the first pass left in L2) quantized with the row's scale. Small chunks keep many rows in flight.
    ONE_CHUNK (BLOCK covers the row): the row stays in registers, gate_up is read once."""
    row = tl.program_id(0).to(tl.int64)
    row_off = row * x_stride
    if ONE_CHUNK:
        y, cols, mask = _silu_mul_chunk(x_ptr, row_off, inter, 0, BLOCK)
        quantize_row_store(y.to(tl.float32), q_ptr + row * inter + cols, s_ptr + row, mask, BLOCK, MIN_AMAX, HW)
        return
    scale = amax_scale(_silu_mul_row_amax(x_ptr, row_off, inter, BLOCK), MIN_AMAX)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, inter, BLOCK):
        y, cols, mask = _silu_mul_chunk(x_ptr, row_off, inter, k0, BLOCK)
        quantize_store(y.to(tl.float32), scale, q_ptr + row * inter + cols, mask, BLOCK, HW)


@triton.jit
def _silu_mul_nvfp4_kernel(x_ptr, out_ptr, gs_ptr, inter, x_stride, BLOCK: tl.constexpr,
                           AMAX_FLOOR: tl.constexpr, HW: tl.constexpr):
    """As _silu_mul_fp8_kernel (amax pass, then recompute), writing the NVFP4 operand with the row's
    power-of-two scale folded in."""
    row = tl.program_id(0).to(tl.int64)
    row_off = row * x_stride
    gs = row_pow2_scale(_silu_mul_row_amax(x_ptr, row_off, inter, BLOCK), gs_ptr + row, AMAX_FLOOR)
    for k0 in range(0, inter, BLOCK):
        y, _, _ = _silu_mul_chunk(x_ptr, row_off, inter, k0, BLOCK)
        qdq_fold_store(y.to(tl.float32), gs, out_ptr + row * inter, k0, inter, BLOCK // 16, HW)


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
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](rows, out, inter, rows.stride(0), BLOCK=block,
                                                                     num_warps=4)
    return out.view(*x.shape[:-1], inter)


def silu_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., 2*I]`` -> ``(x_fp8 [..., I] float8_e4m3fn, scale [..., 1] float32)``, per token.

    The bits of ``fp8_quantize_per_token(silu_mul(x))``; the last dimension must be contiguous.
    """
    rows = _gate_up_rows(x)
    inter = x.shape[-1] // 2
    q = torch.empty(rows.shape[0], inter, dtype=torch.uint8, device=x.device)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    cfg = config("silu_mul_fp8")
    block = min(cfg["block"], triton.next_power_of_2(inter))
    if rows.shape[0]:
        _silu_mul_fp8_kernel[(rows.shape[0],)](rows, q, scale, inter, rows.stride(0), BLOCK=block, MIN_AMAX=MIN_AMAX,
                                               HW=hardware_cast(x), ONE_CHUNK=block >= inter,
                                               num_warps=cfg["num_warps"])
    lead = x.shape[:-1]
    return q.view(torch.float8_e4m3fn).view(*lead, inter), scale.view(*lead, 1)


def silu_mul_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., 2*I]`` -> ``(operand [..., I] x.dtype, scale [..., 1] float32)``: NVFP4 quantize-dequantize per
    token with the dynamic power-of-two scale folded in, the bits of
    ``nvfp4_quantize_dequantize(silu_mul(x), fold_global=True)``; I a multiple of 16."""
    rows = _gate_up_rows(x)
    inter = x.shape[-1] // 2
    if inter % BLOCK_SIZE:
        raise ValueError(f"NVFP4 needs a width that is a multiple of {BLOCK_SIZE}, got {inter}")
    out = torch.empty(rows.shape[0], inter, dtype=x.dtype, device=x.device)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    block = max(16, min(FUSED_CHUNK, triton.next_power_of_2(inter)))
    if rows.shape[0]:
        _silu_mul_nvfp4_kernel[(rows.shape[0],)](rows, out, scale, inter, rows.stride(0), BLOCK=block,
                                                 AMAX_FLOOR=AMAX_FLOOR, HW=hardware_cast(x),
                                                 num_warps=max(1, min(8, block // 256)))
    lead = x.shape[:-1]
    return out.view(*lead, inter), scale.view(*lead, 1)
