"""SiLU-and-multiply over a merged gate_up projection (Triton): ``silu(gate) * up``.

``x [..., 2*I]`` holds gate in its first half and up in its second. Rounded as PyTorch's eager
``F.silu(gate) * up`` is in a 16-bit dtype: silu in float32 rounded to the dtype, then the product
rounded again.

``silu_mul_fp8`` quantizes that rounded product per token to FP8 in the same kernel, with ``fp8_quant.py``'s
epilogue: the bits of ``fp8_quantize_per_token(silu_mul(x))``. It needs the row's amax before any code, so a
program takes a whole row: in chunks (``kernels/tuning.py``'s "silu_mul_fp8" block), twice, or, with a block
that covers the row, once with the row held in registers (``silu_mul`` splits a row into blocks of up to 1024
over programs). One program per row, or a persistent grid of programs_per_sm programs per SM that loop over
the rows.
``silu_mul_nvfp4`` does the same with ``nvfp4_quant.py``'s epilogue: the NVFP4 operand, scale folded in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.fp8_quant import (
    MIN_AMAX,
    abs_max,
    amax_scale,
    check_triton_device,
    hardware_cast,
    max_keep_nan,
    nan_amax,
    quantize_codes,
)
from mixquant_serve.kernels.nvfp4_quant import AMAX_FLOOR, BLOCK_SIZE, qdq_fold_store, row_pow2_scale
from mixquant_serve.kernels.tuning import config, launch_grid

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
        amax = max_keep_nan(amax, tl.abs(y))
    return nan_amax(amax)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, x_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y, cols, mask = _silu_mul_chunk(x_ptr, row * x_stride, inter, tl.program_id(1) * BLOCK, BLOCK)
    tl.store(out_ptr + row * inter + cols, y, mask=mask)


@triton.jit
def _silu_mul_fp8_row(x_ptr, q_ptr, s_ptr, row, inter, x_stride, BLOCK: tl.constexpr, MIN_AMAX: tl.constexpr,
                      HW: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
    """One row. HEAD > 0: the row stays in registers as a HEAD-wide piece and a TAIL-wide one (0: none; no
    padding for 12288 = 8192 + 4096), silu computed once, gate_up read once. Else in BLOCK-wide chunks, twice:
    the row's amax, then the chunks again (recomputed from gate_up, which the first pass left in L2) quantized
    with the row's scale."""
    row_off = row * x_stride
    q_row = q_ptr + row * inter
    if HEAD > 0:
        head, cols, mask = _silu_mul_chunk(x_ptr, row_off, inter, 0, HEAD)
        amax = abs_max(head, None, HW)
        if TAIL > 0:
            tail, tail_cols, tail_mask = _silu_mul_chunk(x_ptr, row_off, inter, HEAD, TAIL)
            amax = max_keep_nan(amax, abs_max(tail, None, HW))
        scale = amax_scale(amax, MIN_AMAX)
        tl.store(s_ptr + row, scale)
        tl.store(q_row + cols, quantize_codes(head.to(tl.float32), scale, HW), mask=mask)
        if TAIL > 0:
            tl.store(q_row + tail_cols, quantize_codes(tail.to(tl.float32), scale, HW), mask=tail_mask)
    else:
        scale = amax_scale(_silu_mul_row_amax(x_ptr, row_off, inter, BLOCK), MIN_AMAX)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, inter, BLOCK):
            y, cols, mask = _silu_mul_chunk(x_ptr, row_off, inter, k0, BLOCK)
            tl.store(q_row + cols, quantize_codes(y.to(tl.float32), scale, HW), mask=mask)


@triton.jit
def _silu_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, n_rows, inter, x_stride, BLOCK: tl.constexpr, MIN_AMAX: tl.constexpr,
                         HW: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr, PERSISTENT: tl.constexpr):
    """One row per program, or (PERSISTENT) rows pid, pid + grid, ... (an ncu run on an H200: the two-pass path
    already reads its second pass from L2 and the kernel is bound by instruction issue, so the row held in
    registers, which computes silu once, is the faster path: benchmarks/RESULTS.md)."""
    if PERSISTENT:
        for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            _silu_mul_fp8_row(x_ptr, q_ptr, s_ptr, row, inter, x_stride, BLOCK, MIN_AMAX, HW, HEAD, TAIL)
    else:
        _silu_mul_fp8_row(x_ptr, q_ptr, s_ptr, tl.program_id(0).to(tl.int64), inter, x_stride, BLOCK, MIN_AMAX,
                          HW, HEAD, TAIL)


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


def _resident_pieces(width: int) -> tuple[int, int]:
    """A row of `width` held in registers as two power-of-two pieces: the largest that fits, then the rest
    rounded up (12288 = 8192 + 4096: no padding)."""
    head = 1 << (width.bit_length() - 1)
    return head, (triton.next_power_of_2(width - head) if width > head else 0)


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
    head, tail = _resident_pieces(inter) if block >= inter else (0, 0)
    if rows.shape[0]:
        grid = launch_grid(rows.shape[0], cfg["programs_per_sm"], x.device)
        _silu_mul_fp8_kernel[(grid,)](rows, q, scale, rows.shape[0], inter, rows.stride(0), BLOCK=block,
                                      MIN_AMAX=MIN_AMAX, HW=hardware_cast(x), HEAD=head, TAIL=tail,
                                      PERSISTENT=grid < rows.shape[0], num_warps=cfg["num_warps"])
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
