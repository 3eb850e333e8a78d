"""Native NVFP4 GEMM on Blackwell (compute capability 10.x / 12.x) through ``torch._scaled_mm``.

UNMEASURED: written and checked on CPU only (operand packing, the scale swizzle, and torch's own
``_scaled_mm`` shape checks on meta tensors); no Blackwell GPU was available. ``NVFP4Method`` selects it
by capability, never on Hopper or CPU; set MIXQUANT_NVFP4_NATIVE=0 to keep the emulated GEMM there.

Operands: our packed codes are already the FP4 operand bytes (E2M1 nibbles, first element in the low
nibble, as ``torch.float4_e2m1fn_x2`` stores them; our "negative zero" nibble 0x8 multiplies as zero).
The E4M3 block scales go in the layout cuBLAS wants for 16-element block scaling: the ``[rows, K/16]``
matrix padded to multiples of (128, 4) and cut into 128 x 4 tiles stored one after another, tiles in
row-major order; inside a tile the scale of (row r, column c) sits at byte ``(r % 32) * 16 + (r // 32) * 4
+ c``. The GEMM accumulates ``e2m1 * block_scale`` products in float32; the global scales (per row for
the activation, per channel for the weight) multiply the float32 result once, as in the emulated path.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import NamedTuple

import torch

_NATIVE_ENV = "MIXQUANT_NVFP4_NATIVE"
_TILE_ROWS, _TILE_COLS = 128, 4


class NativeWeight(NamedTuple):
    """A weight prepared once at load: FP4 codes ``[N, K/2]`` and its swizzled E4M3 block scales."""

    fp4: torch.Tensor
    scales: torch.Tensor


def available(device: torch.device) -> bool:
    """Whether ``device`` has FP4 tensor cores this path drives (sm_100/sm_120) and torch has the dtype."""
    if device.type != "cuda" or os.environ.get(_NATIVE_ENV, "1") == "0":
        return False
    return hasattr(torch, "float4_e2m1fn_x2") and torch.cuda.get_device_capability(device)[0] in (10, 12)


def fits(k: int, n: int) -> bool:
    """Shapes ``_scaled_mm`` takes for FP4: K/2 and N multiples of 16."""
    return k % 32 == 0 and n % 16 == 0


def as_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed uint8 codes ``[R, K/2]`` viewed as ``float4_e2m1fn_x2`` (same bytes)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"want packed uint8 [R, K/2], got {tuple(packed.shape)} {packed.dtype}")
    return packed.contiguous().view(torch.float4_e2m1fn_x2)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales ``[R, C]`` to cuBLAS's 128x4-tiled layout, flat, padded with zeros."""
    if scales.dtype != torch.float8_e4m3fn or scales.dim() != 2:
        raise ValueError(f"want e4m3 block scales [R, C], got {tuple(scales.shape)} {scales.dtype}")
    r, c = scales.shape
    rp, cp = -(-r // _TILE_ROWS) * _TILE_ROWS, -(-c // _TILE_COLS) * _TILE_COLS
    padded = torch.zeros(rp, cp, dtype=torch.uint8, device=scales.device)
    padded[:r, :c] = scales.view(torch.uint8)
    # row = 128 * tile_row + 32 * i + j, column = 4 * tile_col + q  ->  order (tile_row, tile_col, j, i, q)
    tiles = padded.view(rp // _TILE_ROWS, 4, 32, cp // _TILE_COLS, _TILE_COLS)
    return tiles.permute(0, 3, 2, 1, 4).contiguous().flatten().view(torch.float8_e4m3fn)


def unswizzle_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of ``swizzle_scales``: ``[rows, cols]`` E4M3 scales."""
    rp, cp = -(-rows // _TILE_ROWS) * _TILE_ROWS, -(-cols // _TILE_COLS) * _TILE_COLS
    if swizzled.numel() != rp * cp:
        raise ValueError(f"{swizzled.numel()} swizzled scales do not hold [{rows}, {cols}] (want {rp * cp})")
    tiles = swizzled.view(torch.uint8).view(rp // _TILE_ROWS, cp // _TILE_COLS, 32, 4, _TILE_COLS)
    plain = tiles.permute(0, 3, 2, 1, 4).reshape(rp, cp)
    return plain[:rows, :cols].contiguous().view(torch.float8_e4m3fn)


def prepare_weight(packed: torch.Tensor, block_scales: torch.Tensor) -> NativeWeight:
    return NativeWeight(as_fp4(packed), swizzle_scales(block_scales))


def native_mm(x_packed: torch.Tensor, x_block_scales: torch.Tensor, weight: NativeWeight, x_scale: torch.Tensor,
              channel_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``x [T, K] @ W^T`` from NVFP4 operands: FP4 tensor cores, then ``* (x_scale * channel_scale) + bias``.

    ``x_scale`` is 0-d or ``[T, 1]`` float32, ``channel_scale`` ``[N]`` float32.
    """
    out = torch._scaled_mm(as_fp4(x_packed), weight.fp4.T, scale_a=swizzle_scales(x_block_scales),
                           scale_b=weight.scales, out_dtype=_gemm_out_dtype(x_packed.device))
    out = out.float() * (x_scale * channel_scale)
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


@lru_cache(maxsize=8)
def _gemm_out_dtype(device: torch.device) -> torch.dtype:
    """float32 if this torch/cuBLAS writes FP4 GEMMs in float32 (then only the accumulation rounds),
    else bfloat16 (one more rounding of the unscaled result, relative 2**-9)."""
    probe = torch.zeros(128, 32, dtype=torch.uint8, device=device)
    scales = torch.ones(128, 4, device=device).to(torch.float8_e4m3fn)  # K = 64: 4 blocks
    w = prepare_weight(probe, scales)
    try:
        torch._scaled_mm(as_fp4(probe), w.fp4.T, scale_a=w.scales, scale_b=w.scales, out_dtype=torch.float32)
    except RuntimeError:
        return torch.bfloat16
    return torch.float32
