"""FP8 (E4M3) per-token activation quantization in one Triton kernel.

Oracle: ``quant/fp8.py: quantize_fp8_per_token``, matched bit for bit. Per row: ``amax = max|x|`` (NaN if
the row holds one), ``scale = fl32(max(amax, 1e-12)) / 448`` as a true float32 division, then
``e4m3(clamp(x / scale, -448, 448))``, dividing truly again (``tl.div_rn``: Triton's ``/`` on float32 is
an approximate division on the GPU).

On the GPU the E4M3 rounding is the hardware conversion (``cvt.rn.satfinite`` on Hopper: nearest-even,
as torch's cast); in Triton's CPU interpreter, whose conversion does not round to nearest-even, it is done
in integer arithmetic (``e4m3_round``, also the oracle of the GPU path in the tests). The integer path costs
about 30 ALU operations an element and made the kernel compute-bound (28% of copy bandwidth on an H200).
``nvfp4_quant.py`` uses the same switch for its block scales. The fused producers reuse the epilogue:
``quantize_row_store`` for a row held in registers (``rmsnorm_fp8``); ``amax_scale``, ``abs_max`` and
``quantize_codes`` (``silu_mul_fp8``, and this kernel).

Even with the hardware conversion both FP8 producers were bound by instruction issue on an H200 (an ncu run),
not by memory, so ``abs_max`` and ``quantize_codes`` spend fewer instructions an element (a NaN-keeping max, no
clamp before the saturating conversion). A program takes
``rows`` rows as one [rows, K] tile, one group per program or a persistent grid (``kernels/tuning.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.tuning import config, launch_grid

FP8_MAX = 448.0
# float32(1e-12): the floor torch's clamp_min(1e-12) applies to a float32 amax
MIN_AMAX = float(torch.tensor(1e-12, dtype=torch.float32))
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# rows up to ONE_CHUNK_MAX elements are read once and held in registers; longer ones are read twice
# (amax, then quantize), CHUNK elements at a time
ONE_CHUNK_MAX = 8192
CHUNK = 4096


@triton.jit
def e4m3_round(v):
    """float32 ``v`` (|v| <= 448, or NaN) to (E4M3 byte as int32, its value as float32), nearest-even.

    Normal E4M3 (|v| >= 2**-6, float32 biased exponent >= 121) keeps 3 mantissa bits; below that the
    step is 2**-9 (subnormals). The sign is kept, so -0.0 and a negative value that rounds to zero give
    0x80; NaN gives 0x7F | sign, as torch's cast does.
    """
    bits = v.to(tl.int32, bitcast=True)
    neg = bits < 0
    mag = bits & 0x7FFFFFFF
    exp = mag >> 23
    # normal: drop 20 mantissa bits, ties to even; a carry moves into the exponent by itself
    top = (mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20
    normal_code = top - ((127 - 7) << 3)
    normal_val = (top << 20).to(tl.float32, bitcast=True)
    # subnormal: q = round_half_even(v / 2**-9) from the 24-bit significand, q in 0..8
    sig = (mag & 0x7FFFFF) | 0x800000
    shift = tl.maximum(tl.minimum(141 - exp, 26), 1)
    q = (sig + (1 << (shift - 1)) - 1 + ((sig >> shift) & 1)) >> shift
    q = tl.where(exp == 0, 0, q)
    sub = exp < 121
    code = tl.where(sub, q, normal_code)
    val = tl.where(sub, q.to(tl.float32) * 0.001953125, normal_val)
    is_nan = mag > 0x7F800000
    code = tl.where(is_nan, 0x7F, code) | tl.where(neg, 0x80, 0)
    val = tl.where(neg, -val, val)
    # NaN as torch decodes E4M3 0x7F/0xFF: 0x7FF00000 / 0xFFF00000 (-1048576 as int32)
    val = tl.where(is_nan, tl.where(neg, -1048576, 0x7FF00000).to(tl.float32, bitcast=True), val)
    return code, val


@triton.jit
def e4m3_code_value(v, HW: tl.constexpr):
    """``e4m3_round`` (byte as int32, value as float32): by the hardware conversion when HW."""
    if HW:
        f8 = v.to(tl.float8e4nv)
        return f8.to(tl.uint8, bitcast=True).to(tl.int32), f8.to(tl.float32)
    return e4m3_round(v)


def hardware_cast(x: torch.Tensor) -> bool:
    """Whether kernels on x's device may use the GPU's float8 conversion (not in the CPU interpreter)."""
    return x.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def nan_amax(x):
    """max |x| over all of a block as float32; NaN when it holds a NaN (tl.max alone may skip it)."""
    x = tl.reshape(x, [x.numel])
    return tl.where(tl.max((x != x).to(tl.int32), 0) > 0, float("nan"), tl.max(tl.abs(x), 0))


@triton.jit
def _row_amax(x_ptr, row_off, K, BLOCK: tl.constexpr):
    """``nan_amax`` of one row read BLOCK elements at a time."""
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row_off + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        # elementwise running max that keeps a NaN once seen (tl.maximum may drop it)
        amax = tl.where((x != x) | (amax != amax), float("nan"), tl.maximum(amax, tl.abs(x)))
    return nan_amax(amax)


@triton.jit
def quantize_store(x, scale, q_ptrs, mask, BLOCK: tl.constexpr, HW: tl.constexpr):
    y = tl.div_rn(x, tl.broadcast_to(scale, [BLOCK]))
    y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))
    code, _ = e4m3_code_value(y, HW)
    tl.store(q_ptrs, code.to(tl.uint8), mask=mask)


@triton.jit
def amax_scale(amax, MIN_AMAX: tl.constexpr):
    amax = tl.where(amax < MIN_AMAX, MIN_AMAX, amax)  # a comparison, so NaN stays NaN
    return tl.div_rn(amax, tl.full([], 448.0, tl.float32))


@triton.jit
def quantize_row_store(x, q_ptrs, s_ptr, mask, BLOCK: tl.constexpr, MIN_AMAX: tl.constexpr, HW: tl.constexpr):
    """Per-token FP8 of one whole row held in registers: codes to ``q_ptrs``, its float32 scale to ``s_ptr``.

    ``x [BLOCK]`` float32, 0 where ``mask`` is False. The epilogue that the fused RMSNorm kernel shares with
    ``fp8_quantize_per_token``, so both give the same bits.
    """
    scale = amax_scale(nan_amax(x), MIN_AMAX)
    tl.store(s_ptr, scale)
    quantize_store(x, scale, q_ptrs, mask, BLOCK, HW)


@triton.jit
def max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)  # one max.NaN on the GPU


@triton.jit
def abs_max(x, axis: tl.constexpr, HW: tl.constexpr):
    """``nan_amax`` along `axis` (None: over all of x): max |x| as float32, or the NaN that ``nan_amax`` gives
    when a NaN is there. On the GPU one NaN-keeping max an element; the interpreter, whose ``tl.reduce`` calls
    the combine function element by element, reduces as ``nan_amax`` does."""
    x = tl.abs(x.to(tl.float32))
    if HW:
        m = tl.reduce(x, axis, max_keep_nan)
        return tl.where(m != m, float("nan"), m)
    return tl.where(tl.max((x != x).to(tl.int32), axis) > 0, float("nan"), tl.max(x, axis))


@triton.jit
def quantize_codes(x, scale, HW: tl.constexpr):
    """E4M3 bytes of ``x / scale`` (true division; scale broadcast to x, a row's amax / 448), as ``quantize_store``
    writes them. On the GPU the conversion rounds to nearest even and saturates, and ``|x / scale| <= 448 * (1 +
    2**-23)`` (below 464, the first value that overflows), so the clamp to 448 is left out: 4 instructions an
    element fewer."""
    y = tl.div_rn(x, tl.broadcast_to(scale, x.shape))
    if HW:
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    code, _ = e4m3_round(tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y)))
    return code.to(tl.uint8)


@triton.jit
def _fp8_rows(x_ptr, q_ptr, s_ptr, row0, T, K, stride_x, stride_q, ROWS: tl.constexpr, BLOCK: tl.constexpr,
              ONE_CHUNK: tl.constexpr, MIN_AMAX: tl.constexpr, HW: tl.constexpr):
    """Rows row0 .. row0 + ROWS - 1 (those below T) as one [ROWS, BLOCK] tile: held in registers (ONE_CHUNK,
    one read) or read twice in BLOCK-wide chunks (amax, then quantize)."""
    rows = row0 + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)[None, :]
    in_t = (rows < T)[:, None]
    x_rows, q_rows = x_ptr + rows[:, None] * stride_x, q_ptr + rows[:, None] * stride_q
    if ONE_CHUNK:
        mask = in_t & (cols < K)
        x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
        scale = amax_scale(abs_max(x, 1, HW), MIN_AMAX)
        tl.store(s_ptr + rows, scale, mask=rows < T)
        tl.store(q_rows + cols, quantize_codes(x, scale[:, None], HW), mask=mask)
    else:
        amax = tl.zeros([ROWS, BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_rows + k0 + cols, mask=in_t & (k0 + cols < K), other=0.0)
            amax = max_keep_nan(amax, tl.abs(x.to(tl.float32)))
        scale = amax_scale(abs_max(amax, 1, HW), MIN_AMAX)
        tl.store(s_ptr + rows, scale, mask=rows < T)
        for k0 in range(0, K, BLOCK):
            mask = in_t & (k0 + cols < K)
            x = tl.load(x_rows + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + k0 + cols, quantize_codes(x, scale[:, None], HW), mask=mask)


@triton.jit
def _fp8_per_token_kernel(x_ptr, q_ptr, s_ptr, T, K, stride_x, stride_q, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                          ONE_CHUNK: tl.constexpr, MIN_AMAX: tl.constexpr, HW: tl.constexpr,
                          PERSISTENT: tl.constexpr):
    """Group pid of ROWS rows, or (PERSISTENT) groups pid, pid + grid, ..."""
    if PERSISTENT:
        for group in range(tl.program_id(0).to(tl.int64), tl.cdiv(T, ROWS), tl.num_programs(0)):
            _fp8_rows(x_ptr, q_ptr, s_ptr, group * ROWS, T, K, stride_x, stride_q, ROWS, BLOCK, ONE_CHUNK, MIN_AMAX,
                      HW)
    else:
        _fp8_rows(x_ptr, q_ptr, s_ptr, tl.program_id(0).to(tl.int64) * ROWS, T, K, stride_x, stride_q, ROWS, BLOCK,
                  ONE_CHUNK, MIN_AMAX, HW)


def check_triton_device(x: torch.Tensor) -> None:
    """Kernels run on CUDA, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"a Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}")


def fp8_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, K]`` (float32/bfloat16/float16, unit stride along K) to ``(x_fp8 [T, K], scale [T, 1])``.

    ``x_fp8`` is float8_e4m3fn, ``scale`` float32; bit-identical to ``quantize_fp8_per_token``.
    """
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES or x.shape[1] == 0:
        raise ValueError(f"want a 2-D float32/bfloat16/float16 activation with K > 0, got {tuple(x.shape)} "
                         f"{x.dtype}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"want unit stride along K, got strides {x.stride()}")
    check_triton_device(x)
    t, k = x.shape
    q = torch.empty(t, k, dtype=torch.uint8, device=x.device)
    scale = torch.empty(t, 1, dtype=torch.float32, device=x.device)
    if t:
        cfg = config("fp8_per_token")
        one_chunk = triton.next_power_of_2(k) <= ONE_CHUNK_MAX
        block = triton.next_power_of_2(k) if one_chunk else CHUNK
        groups = triton.cdiv(t, cfg["rows"])
        grid = launch_grid(groups, cfg["programs_per_sm"], x.device)
        _fp8_per_token_kernel[(grid,)](x, q, scale, t, k, x.stride(0), q.stride(0), ROWS=cfg["rows"], BLOCK=block,
                                       ONE_CHUNK=one_chunk, MIN_AMAX=MIN_AMAX, HW=hardware_cast(x),
                                       PERSISTENT=grid < groups,
                                       num_warps=cfg["num_warps"] or (4 if block <= 1024 else 8))
    return q.view(torch.float8_e4m3fn), scale
