"""NVFP4: 4-bit E2M1 values in blocks of 16, an E4M3 scale per block, an FP32 scale per tensor.

Pure functions on tensors (CPU or CUDA), bit-exact with NVIDIA Model Optimizer's NVFP4 quantizer
(``NVFP4QTensor.quantize`` / ``.dequantize``, nvidia-modelopt 0.47):

- ``global_scale = amax / (6 * 448)``; scales multiply to dequantize (checkpoints call the weight's
  ``weight_scale_2`` and the activation's ``input_scale``). One per tensor, or one per row
  (``nvfp4_row_global_scale``: a dynamic activation scale that makes a row independent of its batch;
  rounded up to a power of two, so that ``e2m1 * block_scale * global_scale`` stays exact in bfloat16
  and a plain BF16 GEMM can take the activation with its scale folded in).
- ``block_scale = e4m3(clamp(block_amax / (6 * global_scale), 2**-9, 448))``; an all-zero block gets 1.0.
  The clamp is applied in float32 *before* the cast to E4M3 (so nothing underflows to 0 or overflows
  to NaN), and ``6 * global_scale`` is rounded to float32 before the division.
- ``code = rne(x / (block_scale * global_scale))`` on the grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}, saturating
  at 6; the divisor is rounded to float32 first and the division is done in float32 (float64 for a
  float64 ``x``), never as a multiplication by a reciprocal.
- A nibble is ``sign << 3 | index``; two nibbles per byte, the first element in the LOW nibble.
- ``value = e2m1 * fl32(block_scale * global_scale)``: the two scales are multiplied first, then the
  code, in float32, then cast to the requested dtype.

Details where Model Optimizer's behaviour is not the textbook one, matched here bit for bit:
- The sign bit is ``x < 0`` of the scaled value, so -0.0 encodes as 0x0 but a small negative value
  that rounds to zero encodes as 0x8 ("negative zero"). Nibble 0x8 decodes to +0.0, not -0.0.
- NaN in a block makes its E4M3 scale NaN and every code in the block 0x7 (+6).
- Clamping before the E4M3 cast is what Model Optimizer does; with torch's cast (which rounds tiny
  values to 0 and saturates finite overflow to 448) it gives the same bits as clamping after it.

Where this module deliberately differs:
- ``nvfp4_global_scale`` floors a zero amax (Model Optimizer gives a zero scale, then NaN block scales)
  and always divides truly. PyTorch's CUDA kernel turns ``amax / 2688.0`` into ``amax * (1 / 2688)``,
  so Model Optimizer's global scale computed on a GPU can be 1 ulp off ours and off its own CPU
  result. Checkpoints carry their scales, so this matters only when quantizing here.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import torch

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SCALE = 2.0**-9  # the smallest positive (subnormal) E4M3 value
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes of E2M1_GRID; bound i lies between codes i and i + 1.
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# Elements handled per step by the chunked loops: bounds the float32/int64 temporaries (~100 MiB).
_CHUNK_ELEMENTS = 1 << 22


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor scale ``amax / (6 * 448)`` as a float32 tensor (multiply to dequantize).

    An amax below ``6 * 448 * float32.tiny`` (zero included) is raised to that, so the scale stays
    positive and an all-zero tensor quantizes to zeros; Model Optimizer would give 0 and then NaN scales.
    The division is a true float32 division on every device.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    floor = E2M1_MAX * E4M3_MAX * torch.finfo(torch.float32).tiny
    # A tensor divisor: CUDA turns division by a Python number into multiplication by its reciprocal,
    # which can differ in the last bit from the CPU's (and Model Optimizer's CPU) true division.
    return amax.clamp_min(floor) / amax.new_full((), E2M1_MAX * E4M3_MAX)


def nvfp4_row_global_scale(x: torch.Tensor) -> torch.Tensor:
    """One global scale per row of ``x [..., K]``: ``pow2_ceil(nvfp4_global_scale(max|row|))``, float32 ``[..., 1]``.

    A power of two at or above ``amax / 2688`` keeps every block scale within E4M3's range (the largest
    block lands in [224, 448]; E4M3 rounds as finely there as anywhere in its normal range), and
    multiplying by it is exact, so the activation can carry it into the GEMM's operand."""
    return pow2_ceil(nvfp4_global_scale(x.abs().amax(dim=-1, keepdim=True)))


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each positive normal float32 of ``s``; inf and NaN stay as they are."""
    bits = s.contiguous().view(torch.int32)
    exponent = bits & 0x7F800000
    up = torch.where((bits & 0x007FFFFF) != 0, exponent + 0x00800000, exponent).view(torch.float32)
    return torch.where(torch.isfinite(s), up, s)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """``max(|x|)`` as a float32 0-d tensor, without materialising ``|x|``."""
    lo, hi = torch.aminmax(x)
    return torch.maximum(lo.abs(), hi.abs()).float()


def e2m1_encode(scaled: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 nibbles (uint8, one per element, in 0..15).

    Round half to even, saturating at +-6. A value exactly on bound i (between codes i and i + 1)
    moves up only when i + 1 is even. Comparisons are written as ``~(mag < b)`` / ``~(mag <= b)`` so
    that NaN counts as above every bound (code 7), as in Model Optimizer.
    """
    mag = scaled.abs()
    code = (scaled < 0).to(torch.uint8) << 3
    for i, bound in enumerate(_E2M1_BOUNDS):
        above = ~(mag < bound) if i % 2 else ~(mag <= bound)
        code += above
    return code


@lru_cache(maxsize=16)
def _e2m1_table(device: torch.device) -> torch.Tensor:
    # Nibbles 8..15 are the negatives of 0..7, except that 8 is +0.0 (Model Optimizer's table).
    values = list(E2M1_GRID) + [0.0] + [-v for v in E2M1_GRID[1:]]
    return torch.tensor(values, dtype=torch.float32, device=device)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 nibbles (uint8, 0..15) to their float32 values."""
    return _e2m1_table(codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` uint8 nibbles to ``[..., n]`` bytes; element 2j in the low nibble of byte j."""
    if codes.shape[-1] % 2:
        raise ValueError(f"need an even number of nibbles on the last axis, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` uint8 bytes to ``[..., 2n]`` nibbles (low nibble first)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed NVFP4 data must be uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def _as_scale(global_scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    scale = torch.as_tensor(global_scale, dtype=torch.float32).to(device)
    if scale.numel() != 1:
        raise ValueError(f"the global scale must be a scalar, got shape {tuple(scale.shape)}")
    return scale.reshape(())


def _as_scales(global_scale: torch.Tensor | float, rows: int, device: torch.device) -> torch.Tensor:
    """A scalar global scale as 0-d, or one per row as ``[rows, 1]`` (float32)."""
    scale = torch.as_tensor(global_scale, dtype=torch.float32).to(device)
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() != rows:
        raise ValueError(f"the global scale must be a scalar or one per row ({rows}), got {tuple(scale.shape)}")
    return scale.reshape(rows, 1)


def _rows_of(scale: torch.Tensor, part: slice) -> torch.Tensor:
    return scale if scale.dim() == 0 else scale[part]


def _row_chunks(rows: int, row_elements: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _check_k(k: int) -> None:
    if k % BLOCK_SIZE:
        raise ValueError(f"the last axis ({k}) must be a multiple of {BLOCK_SIZE}")


def _block_scales(blocks: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``[r, K/16, 16]`` values to ``[r, K/16]`` E4M3 block scales."""
    amax = blocks.abs().amax(dim=-1).float()
    scale = amax / (E2M1_MAX * global_scale)
    scale = torch.where(scale == 0, 1.0, scale)
    return scale.clamp(min=E4M3_MIN_SCALE, max=E4M3_MAX).to(torch.float8_e4m3fn)


def _quantize_rows(rows: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = rows.unflatten(-1, (-1, BLOCK_SIZE))
    scales = _block_scales(blocks, global_scale)
    divisor = scales.float() * global_scale
    codes = e2m1_encode(blocks / divisor.unsqueeze(-1))
    return pack_nibbles(codes.flatten(-2)), scales


@torch.no_grad()
def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., K]`` (K a multiple of 16, any float dtype) to NVFP4.

    Returns ``(packed, block_scales)``: uint8 ``[..., K/2]`` and float8_e4m3fn ``[..., K/16]``.
    ``global_scale`` is the float32 per-tensor scale (see ``nvfp4_global_scale``), or one per row
    (``[..., 1]``, see ``nvfp4_row_global_scale``); it must be positive.
    Works in row chunks, so the temporaries stay small whatever the size of ``x``.
    """
    if not x.is_floating_point():
        raise TypeError(f"NVFP4 quantizes floating-point tensors, got {x.dtype}")
    k = x.shape[-1]
    _check_k(k)
    rows = x.reshape(-1, k)
    scale = _as_scales(global_scale, rows.shape[0], x.device)
    packed = torch.empty(rows.shape[0], k // 2, dtype=torch.uint8, device=x.device)
    block_scales = torch.empty(rows.shape[0], k // BLOCK_SIZE, dtype=torch.float8_e4m3fn, device=x.device)
    for part in _row_chunks(rows.shape[0], k):
        packed[part], block_scales[part] = _quantize_rows(rows[part], _rows_of(scale, part))
    lead = x.shape[:-1]
    return packed.reshape(*lead, k // 2), block_scales.reshape(*lead, k // BLOCK_SIZE)


def _check_packed(packed: torch.Tensor, block_scales: torch.Tensor) -> int:
    k = packed.shape[-1] * 2
    _check_k(k)
    if block_scales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"block scales must be float8_e4m3fn, got {block_scales.dtype}")
    if block_scales.shape != (*packed.shape[:-1], k // BLOCK_SIZE):
        raise ValueError(f"block scales {tuple(block_scales.shape)} do not fit packed {tuple(packed.shape)}")
    return k


def _dequantize_rows(packed: torch.Tensor, block_multiplier: torch.Tensor) -> torch.Tensor:
    """``[r, K/2]`` bytes times float32 ``[r, K/16]`` per-block multipliers to float32 ``[r, K]``."""
    values = e2m1_decode(unpack_nibbles(packed)).unflatten(-1, (-1, BLOCK_SIZE))
    return (values * block_multiplier.unsqueeze(-1)).flatten(-2)


def _dequantize(
    packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    k = _check_packed(packed, block_scales)
    rows, scales = packed.reshape(-1, k // 2), block_scales.reshape(-1, k // BLOCK_SIZE)
    out = torch.empty(rows.shape[0], k, dtype=dtype, device=packed.device)
    for part in _row_chunks(rows.shape[0], k):
        multiplier = scales[part].float()
        if global_scale is not None:
            multiplier = multiplier * _rows_of(global_scale, part)
        out[part] = _dequantize_rows(rows[part], multiplier)
    return out.reshape(*packed.shape[:-1], k)


@torch.no_grad()
def dequantize_nvfp4(
    packed: torch.Tensor,
    block_scales: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """NVFP4 ``(packed [..., K/2], block_scales [..., K/16], global_scale)`` to ``dtype [..., K]``.

    Computes ``e2m1 * fl32(block_scale * global_scale)`` in float32, then casts (Model Optimizer's order).
    ``global_scale`` is a scalar or one per row, as in ``quantize_nvfp4``.
    """
    rows = packed.numel() // max(1, packed.shape[-1])
    return _dequantize(packed, block_scales, _as_scales(global_scale, rows, packed.device), dtype)


@torch.no_grad()
def dequantize_nvfp4_blocks(
    packed: torch.Tensor, block_scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``e2m1 * block_scale`` as ``dtype [..., K]``, WITHOUT the global scale.

    Exact in float32, bfloat16, float16 (and TF32): a product of a 2-bit and a 4-bit significand
    within [2**-10, 2688], so a GEMM over these operands rounds only in its accumulation.
    """
    return _dequantize(packed, block_scales, None, dtype)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | float) -> torch.Tensor:
    """``dequantize_nvfp4(quantize_nvfp4(x))`` in the dtype of ``x``."""
    packed, block_scales = quantize_nvfp4(x, global_scale)
    return dequantize_nvfp4(packed, block_scales, global_scale, dtype=x.dtype)


def _check_weight(w_packed: torch.Tensor, w_block_scales: torch.Tensor, k: int) -> None:
    if w_packed.dim() != 2 or w_packed.shape[1] * 2 != k:
        raise ValueError(f"packed weight {tuple(w_packed.shape)} does not fit K={k} (want [N, K/2])")
    _check_packed(w_packed, w_block_scales)


@torch.no_grad()
def nvfp4_matmul(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_block_scales: torch.Tensor,
    w_global_scale: torch.Tensor | float,
    input_global_scale: torch.Tensor | float | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W4A4 linear ``x @ W^T`` with an NVFP4 weight ``[N, K/2] + [N, K/16] + scalar``; returns ``[..., N]``.

    The activation ``x [..., K]`` is quantized to NVFP4 along K with the per-tensor
    ``input_global_scale`` (static; one per row is taken too), or when None with one scale per row,
    ``nvfp4_row_global_scale(x)`` (dynamic: a row's result does not depend on the other rows of the
    batch). Both operands are then dequantized exactly without their global scales
    (``dequantize_nvfp4_blocks``), multiplied with float32 accumulation, and the result is multiplied
    once by ``fl32(input_global_scale * w_global_scale)`` (per row). This equals a native FP4 tensor-core GEMM up
    to accumulation order. On CUDA the exact operands travel as bfloat16 through a bf16 GEMM with
    float32 output; elsewhere as float32. The weight is dequantized a slice of output channels at a
    time; the activation is held dequantized once. ``out_dtype`` defaults to the dtype of ``x``.
    """
    k = x.shape[-1]
    _check_weight(w_packed, w_block_scales, k)
    rows = x.reshape(-1, k)
    n = w_packed.shape[0]
    out = torch.empty(rows.shape[0], n, dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        if input_global_scale is None:
            input_global_scale = nvfp4_row_global_scale(rows)
        x_scale = _as_scales(input_global_scale, rows.shape[0], x.device)
        operand = torch.bfloat16 if _has_mm_out_float32(x.device) else torch.float32
        x_blocks = dequantize_nvfp4_blocks(*quantize_nvfp4(rows, x_scale), dtype=operand)
        for part in _row_chunks(n, k):
            w_blocks = dequantize_nvfp4_blocks(w_packed[part], w_block_scales[part], dtype=operand)
            out[:, part] = _mm_float32(x_blocks, w_blocks.T)
        out *= x_scale * _as_scale(w_global_scale, x.device)
    return out.to(out_dtype or x.dtype).reshape(*x.shape[:-1], n)


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in float32 (bfloat16 operands use tensor cores)."""
    return a @ b if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)


@lru_cache(maxsize=16)
def _has_mm_out_float32(device: torch.device) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=float32)`` runs on ``device`` (CUDA, torch >= 2.8)."""
    if device.type != "cuda":
        return False
    a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False
