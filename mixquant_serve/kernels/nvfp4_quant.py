"""NVFP4 activation quantization (16-element blocks) in one Triton kernel, one program per row.

Oracle: ``quant/nvfp4.py`` (``quantize_nvfp4``, ``dequantize_nvfp4_blocks``, ``nvfp4_row_global_scale``),
matched bit for bit:
- global scale: a float32 scalar, one per row, or (None) computed per row here as
  ``pow2_ceil(fl32(max(amax_row, 6 * 448 * tiny)) / 2688)``, a true division (``tl.div_rn``) rounded up to
  a power of two;
- ``block_scale = e4m3(clamp(where(s == 0, 1, s), 2**-9, 448))`` with ``s = block_amax / fl32(6 * gs)``;
- ``code = rne_e2m1(x / fl32(block_scale * gs))`` with Model Optimizer's sign (``x < 0``, so a small
  negative value gives the "negative zero" nibble 0x8) and NaN (the block's scale is NaN, codes 0x7);
- packed low nibble first, or (``nvfp4_quantize_dequantize``) the exact ``e2m1 * block_scale`` without
  the global scale, which is what the emulated GEMM consumes, or with the dynamic (power-of-two) scale
  folded in, ``e2m1 * block_scale * global_scale``, still exact: the operand of a plain BF16 GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.fp8_quant import _row_amax, check_triton_device, e4m3_code_value, hardware_cast, nan_amax

BLOCK_SIZE = 16
# float32(6 * 448 * float32.tiny): the floor of a per-row amax (nvfp4_global_scale's)
AMAX_FLOOR = float(torch.tensor(6.0 * 448.0 * torch.finfo(torch.float32).tiny, dtype=torch.float32))
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# rows of up to ONE_CHUNK_MAX_BLOCKS blocks (K <= 4096) are read once and held in registers; longer rows
# are read CHUNK_BLOCKS blocks at a time (twice for the dynamic scale: amax, then quantize)
ONE_CHUNK_MAX_BLOCKS = 256
CHUNK_BLOCKS = 128


@triton.jit
def _e2m1_code(y):
    """Scaled float32 values to E2M1 nibbles (int32): round half to even, saturate at 6, NaN -> 7."""
    mag = tl.abs(y)
    code = tl.where(y < 0, 8, 0)
    # bound i between codes i and i+1 moves up on a tie only when i+1 is even (`<=` vs `<`); NaN moves up
    code += tl.where(mag <= 0.25, 0, 1)
    code += tl.where(mag < 0.75, 0, 1)
    code += tl.where(mag <= 1.25, 0, 1)
    code += tl.where(mag < 1.75, 0, 1)
    code += tl.where(mag <= 2.5, 0, 1)
    code += tl.where(mag < 3.5, 0, 1)
    code += tl.where(mag <= 5.0, 0, 1)
    return code


@triton.jit
def _e2m1_code_of_quotient(x, d):
    """``_e2m1_code(fl(x / d))`` without the division, for ``d`` (broadcast like x) a power of two times an E4M3
    value, normal and well inside float32's range, and x with no quotient that underflows to -0.

    Then ``t * d`` is exact for every bound t (at most 7 significant bits) and half an ulp of t, times d, is less
    than an ulp of ``t * d``, so no float lies between ``t * d`` and the quotient's rounding boundary:
    ``fl(|x|/d) <= t`` exactly when ``|x| <= t * d`` (bounds 0.25, 1.25, 2.5, 5: their ties round down to them)
    and ``fl(|x|/d) < t`` exactly when ``|x| < t * d`` (0.75, 1.75, 3.5: ties round up to them)."""
    mag = tl.abs(x)
    code = tl.where(x < 0, 8, 0)
    code += tl.where(mag <= d * 0.25, 0, 1)
    code += tl.where(mag < d * 0.75, 0, 1)
    code += tl.where(mag <= d * 1.25, 0, 1)
    code += tl.where(mag < d * 1.75, 0, 1)
    code += tl.where(mag <= d * 2.5, 0, 1)
    code += tl.where(mag < d * 3.5, 0, 1)
    code += tl.where(mag <= d * 5.0, 0, 1)
    return code


@triton.jit
def _e2m1_codes(xe, xo, d, NB: tl.constexpr, POW2: tl.constexpr):
    """E2M1 codes of the ``[NB, 8]`` tiles divided by their blocks' divisors ``d [NB]``: the rounded quotient's
    ``_e2m1_code``. POW2 (the global scale is a power of two): without the division where that is exact for the
    whole tile (every d normal and finite, no negative x so small that its quotient would round to -0: then the
    nibble is 0, not 8), else, and without POW2, by a true division."""
    dd = tl.broadcast_to(d[:, None], [NB, 8])
    fast = False
    if POW2:
        ok = ((d >= 2.0**-120) & (d <= 2.0**120)).to(tl.int32)  # NaN fails
        tiny = (((xe < 0) & (tl.abs(xe) * 2.0**100 < dd)) | ((xo < 0) & (tl.abs(xo) * 2.0**100 < dd))).to(tl.int32)
        fast = (tl.min(ok, 0) == 1) & (tl.max(tl.max(tiny, 1), 0) == 0)
    if fast:
        ce = _e2m1_code_of_quotient(xe, dd)
        co = _e2m1_code_of_quotient(xo, dd)
    else:
        ce = _e2m1_code(tl.div_rn(xe, dd))
        co = _e2m1_code(tl.div_rn(xo, dd))
    return ce, co


@triton.jit
def _e2m1_value(code):
    """Nibbles to float32 values; 0x8 is +0.0 (Model Optimizer's table)."""
    idx = code & 7
    mag = tl.where(idx < 4, idx.to(tl.float32) * 0.5, tl.where(idx == 7, 6.0, (idx - 2).to(tl.float32)))
    return tl.where(code >= 8, 0.0 - mag, mag)


@triton.jit
def _load_pairs(x_ptr, row_off, k0, K, NB: tl.constexpr):
    """NB blocks from element k0 as float32 ``[NB, 8]`` tiles of even and odd elements (2j, 2j+1), read as
    contiguous ``[NB, 16]`` rows (wide loads) and split in registers; also the offsets and mask of the rows."""
    offs = k0 + tl.arange(0, NB)[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = offs < K  # K is a multiple of 16: whole blocks are in or out
    x = tl.load(x_ptr + row_off + offs, mask=mask, other=0.0).to(tl.float32)
    xe, xo = tl.split(tl.reshape(x, [NB, 8, 2]))
    return xe, xo, offs, mask


@triton.jit
def _dynamic_global_scale(amax, gs_ptr, row, AMAX_FLOOR: tl.constexpr):
    """``pow2_ceil(fl32(max(amax, floor)) / 2688)``, a true division rounded up to a power of two (NaN and
    inf kept); stored as the row's scale for the epilogue."""
    amax = tl.where(amax < AMAX_FLOOR, AMAX_FLOOR, amax)  # a comparison, so NaN stays NaN
    gs = tl.div_rn(amax, tl.full([], 2688.0, tl.float32))
    bits = gs.to(tl.int32, bitcast=True)
    exponent = bits & 0x7F800000
    up = tl.where((bits & 0x007FFFFF) != 0, exponent + 0x00800000, exponent).to(tl.float32, bitcast=True)
    gs = tl.where(exponent == 0x7F800000, gs, up)
    tl.store(gs_ptr + row, gs)
    return gs


@triton.jit
def _quantize_pairs(xe, xo, gs, offs, mask, k0, K, packed_row, scale_row, deq_row, NB: tl.constexpr,
                    DEQUANT: tl.constexpr, FOLD: tl.constexpr, HW: tl.constexpr, POW2: tl.constexpr):
    """Quantize NB blocks (``_load_pairs``' tiles) with global scale ``gs`` (POW2: a power of two, the dynamic
    scale) and store them."""
    amax = tl.maximum(tl.max(tl.abs(xe), 1), tl.max(tl.abs(xo), 1))
    nan = tl.max(((xe != xe) | (xo != xo)).to(tl.int32), 1) > 0
    s = tl.where(nan, float("nan"), tl.div_rn(amax, tl.broadcast_to(gs * 6.0, [NB])))
    s = tl.where(s == 0, 1.0, s)
    s = tl.where(s < 0.001953125, 0.001953125, tl.where(s > 448.0, 448.0, s))  # NaN passes through
    s_code, s_val = e4m3_code_value(s, HW)
    ce, co = _e2m1_codes(xe, xo, s_val * gs, NB, POW2)
    if DEQUANT:
        values = tl.reshape(tl.join(_e2m1_value(ce), _e2m1_value(co)), [NB, 16]) * s_val[:, None]
        if FOLD:  # a power of two: exact
            values = values * gs
        tl.store(deq_row + offs, values.to(deq_row.dtype.element_ty), mask=mask)
    else:
        pk = k0 // 2 + tl.arange(0, NB)[:, None] * 8 + tl.arange(0, 8)[None, :]
        tl.store(packed_row + pk, (ce | (co << 4)).to(tl.uint8), mask=pk < K // 2)
        blocks = k0 // 16 + tl.arange(0, NB)
        tl.store(scale_row + blocks, s_code.to(tl.uint8), mask=blocks < K // 16)


@triton.jit
def _nvfp4_quant_kernel(x_ptr, gs_ptr, packed_ptr, scale_ptr, deq_ptr, K, stride_x, gs_stride, stride_p,
                        stride_s, stride_d, DYNAMIC: tl.constexpr, DEQUANT: tl.constexpr, FOLD: tl.constexpr,
                        NB: tl.constexpr,
                        ONE_CHUNK: tl.constexpr, AMAX_FLOOR: tl.constexpr, HW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_off = row * stride_x
    p_row, s_row, d_row = packed_ptr + row * stride_p, scale_ptr + row * stride_s, deq_ptr + row * stride_d
    if ONE_CHUNK:  # the whole row in registers: read once, also for the dynamic scale
        xe, xo, offs, mask = _load_pairs(x_ptr, row_off, 0, K, NB)
        if DYNAMIC:
            a, b = nan_amax(xe), nan_amax(xo)
            gs = _dynamic_global_scale(tl.where(a != a, a, tl.where(b != b, b, tl.maximum(a, b))), gs_ptr, row,
                                       AMAX_FLOOR)
        else:
            gs = tl.load(gs_ptr + row * gs_stride)
        _quantize_pairs(xe, xo, gs, offs, mask, 0, K, p_row, s_row, d_row, NB, DEQUANT, FOLD, HW, DYNAMIC)
    else:
        if DYNAMIC:
            gs = _dynamic_global_scale(_row_amax(x_ptr, row_off, K, NB * 16), gs_ptr, row, AMAX_FLOOR)
        else:
            gs = tl.load(gs_ptr + row * gs_stride)
        for k0 in range(0, K, NB * 16):
            xe, xo, offs, mask = _load_pairs(x_ptr, row_off, k0, K, NB)
            _quantize_pairs(xe, xo, gs, offs, mask, k0, K, p_row, s_row, d_row, NB, DEQUANT, FOLD, HW, DYNAMIC)


@triton.jit
def row_pow2_scale(amax, gs_ptr, AMAX_FLOOR: tl.constexpr):
    """A row's dynamic global scale from its amax (power of two), stored at gs_ptr: for fused producers."""
    return _dynamic_global_scale(amax, gs_ptr, 0, AMAX_FLOOR)


@triton.jit
def qdq_fold_store(y, gs, deq_row, k0, K, NB: tl.constexpr, HW: tl.constexpr):
    """NVFP4 quantize-dequantize of NB blocks held in registers (``y [NB * 16]`` float32: columns k0.. of a
    row, 0 past K) with the row's power-of-two scale ``gs`` folded in, stored at ``deq_row + k0..``: what
    ``nvfp4_quantize_dequantize(fold_global=True)`` writes for them. For fused producers."""
    offs = k0 + tl.arange(0, NB)[:, None] * 16 + tl.arange(0, 16)[None, :]
    xe, xo = tl.split(tl.reshape(y, [NB, 8, 2]))
    _quantize_pairs(xe, xo, gs, offs, offs < K, k0, K, deq_row, deq_row, deq_row, NB, True, True, HW, True)


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"want a 2-D float32/bfloat16/float16 activation, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] == 0 or x.shape[1] % BLOCK_SIZE:
        raise ValueError(f"K ({x.shape[1]}) must be a positive multiple of {BLOCK_SIZE}")
    if x.stride(1) != 1:
        raise ValueError(f"want unit stride along K, got strides {x.stride()}")
    check_triton_device(x)


def _global_scale(x: torch.Tensor, global_scale: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The float32 scale buffer the kernel reads (or, dynamic, writes) and its stride per row."""
    t = x.shape[0]
    if global_scale is None:
        return torch.empty(t, 1, dtype=torch.float32, device=x.device), 1
    if global_scale.dtype != torch.float32 or global_scale.device != x.device:
        raise ValueError(f"the global scale must be float32 on {x.device}, got {global_scale.dtype} "
                         f"on {global_scale.device}")
    if global_scale.numel() == 1:
        return global_scale.reshape(()), 0
    if global_scale.numel() != t:
        raise ValueError(f"the global scale must be a scalar or one per row ({t}), got {tuple(global_scale.shape)}")
    return global_scale.reshape(t, 1).contiguous(), 1


def _launch(x: torch.Tensor, global_scale: torch.Tensor | None, packed: torch.Tensor, scales: torch.Tensor,
            deq: torch.Tensor, dequant: bool, fold: bool = False) -> torch.Tensor:
    gs, gs_stride = _global_scale(x, global_scale)
    t, k = x.shape
    if t:
        blocks = triton.next_power_of_2(k // BLOCK_SIZE)
        one_chunk = blocks <= ONE_CHUNK_MAX_BLOCKS
        nb = blocks if one_chunk else CHUNK_BLOCKS
        _nvfp4_quant_kernel[(t,)](x, gs, packed, scales, deq, k, x.stride(0), gs_stride, packed.stride(0),
                                  scales.stride(0), deq.stride(0), DYNAMIC=global_scale is None,
                                  DEQUANT=dequant, FOLD=fold, NB=nb, ONE_CHUNK=one_chunk, AMAX_FLOOR=AMAX_FLOOR,
                                  HW=hardware_cast(x),
                                  num_warps=4 if nb <= 32 else 8)
    return gs


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, K]`` to ``(packed uint8 [T, K/2], block_scales e4m3 [T, K/16], global_scale)``.

    ``global_scale``: float32 scalar, or ``[T]``/``[T, 1]`` one per row, or None for the per-row dynamic
    scale; returned as used (float32, 0-d for a scalar, else ``[T, 1]``).
    """
    _check_x(x)
    t, k = x.shape
    packed = torch.empty(t, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(t, k // BLOCK_SIZE, dtype=torch.uint8, device=x.device)
    gs = _launch(x, global_scale, packed, scales, packed, dequant=False)
    return packed, scales.view(torch.float8_e4m3fn), gs


def nvfp4_quantize_dequantize(x: torch.Tensor, global_scale: torch.Tensor | None = None,
                              out_dtype: torch.dtype = torch.bfloat16, fold_global: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, K]`` to ``(blocks [T, K] out_dtype, global_scale)``: ``e2m1 * block_scale``, no global scale,
    or with ``fold_global`` (dynamic scale only: a power of two) ``e2m1 * block_scale * global_scale``.

    Exact in float32, bfloat16 and float16 (folded: barring float16 overflow). ``global_scale`` as in
    ``nvfp4_quantize``.
    """
    _check_x(x)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32/bfloat16/float16, got {out_dtype}")
    if fold_global and global_scale is not None:
        raise ValueError("fold_global needs the dynamic (power-of-two) scale: pass global_scale=None")
    deq = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    gs = _launch(x, global_scale, deq, deq, deq, dequant=True, fold=fold_global)
    return deq, gs
