"""NVFP4 GEMM reading the PACKED weight: ``out = cast((a @ W^T) * (row_scale * col_scale) + bias)``.

``W`` arrives as E2M1 codes ``[N, K/2]`` (uint8, first element in the low nibble) and E4M3 block scales
``[N, K/16]``, 4.5 bits per weight in memory, and is decoded to ``e2m1 * block_scale`` in registers,
tile by tile (exact in bfloat16/float16). ``a`` is the activation's exact ``e2m1 * block_scale``
(``nvfp4_quant.nvfp4_quantize_dequantize``). Products accumulate in float32 and both global scales are
applied once in the epilogue, as in ``scaled_mm.py`` (the other design: a dequantized weight cached in
bfloat16, 16 bits per weight, and no decoding in the loop). Nibble 0x8 decodes to +0.0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.nvfp4_quant import _e2m1_value
from mixquant_serve.kernels.scaled_mm import _HOPPER_CONFIGS, _tile_ids, check_epilogue, scaled_epilogue

_OPERAND_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _e4m3_value(byte):
    """E4M3 bytes (int32) to float32, in integer arithmetic (subnormals exact; 0x7F/0xFF -> NaN)."""
    exp = (byte >> 3) & 15
    man = byte & 7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    val = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
    val = tl.where((byte & 0x7F) == 0x7F, float("nan"), val)
    return tl.where(byte >= 128, 0.0 - val, val)


@triton.jit
def _weight_tile(w_ptrs, s_ptrs, k_left, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Decode one ``[BLOCK_N, BLOCK_K]`` weight tile: codes times their block scale, float32."""
    if EVEN_K:
        byte = tl.load(w_ptrs).to(tl.int32)
        scale = _e4m3_value(tl.load(s_ptrs).to(tl.int32))
    else:
        half = tl.arange(0, BLOCK_K // 2)[None, :]
        byte = tl.load(w_ptrs, mask=half < k_left // 2, other=0).to(tl.int32)
        blocks = tl.arange(0, BLOCK_K // 16)[None, :]
        scale = _e4m3_value(tl.load(s_ptrs, mask=blocks < k_left // 16, other=0).to(tl.int32))
    # element 2j is the low nibble of byte j: join on a new last axis, then flatten keeps that order
    vals = tl.reshape(tl.join(_e2m1_value(byte & 15), _e2m1_value(byte >> 4)), (BLOCK_N, BLOCK_K))
    vals = tl.reshape(vals, (BLOCK_N, BLOCK_K // 16, 16)) * scale[:, :, None]
    return tl.reshape(vals, (BLOCK_N, BLOCK_K))


@triton.jit
def _nvfp4_gemm_kernel(a_ptr, w_ptr, ws_ptr, rs_ptr, cs_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET,
                       stride_am, stride_ak, stride_wn, stride_sn, stride_cm, stride_cn, rs_stride,
                       HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rm % M)[:, None] * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + (rn % N)[:, None] * stride_wn + tl.arange(0, BLOCK_K // 2)[None, :]
    s_ptrs = ws_ptr + (rn % N)[:, None] * stride_sn + tl.arange(0, BLOCK_K // 16)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs) if EVEN_K else tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        w = _weight_tile(w_ptrs, s_ptrs, k_left, BLOCK_N, BLOCK_K, EVEN_K)
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // 16
    scaled_epilogue(acc, rm, rn, M, N, rs_ptr, rs_stride, cs_ptr, bias_ptr, c_ptr, stride_cm, stride_cn, HAS_BIAS)


_nvfp4_gemm_tuned = triton.autotune(configs=_HOPPER_CONFIGS, key=["M_BUCKET", "N", "K"])(_nvfp4_gemm_kernel)
_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def _check(a: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, row_scale: torch.Tensor,
           col_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    k = a.shape[1] if a.dim() == 2 else -1
    if a.dim() != 2 or k % 16 or a.dtype not in _OPERAND_DTYPES:
        raise ValueError(f"want a [M, K] float16/bfloat16/float32 with K a multiple of 16, got {tuple(a.shape)} "
                         f"{a.dtype}")
    n = w_packed.shape[0]
    if w_packed.dtype != torch.uint8 or tuple(w_packed.shape) != (n, k // 2) or w_packed.stride(1) != 1:
        raise ValueError(f"packed weight must be uint8 [N, K/2] = [N, {k // 2}] with unit stride, got "
                         f"{tuple(w_packed.shape)} {w_packed.dtype}")
    if w_scales.dtype != torch.float8_e4m3fn or tuple(w_scales.shape) != (n, k // 16) or w_scales.stride(1) != 1:
        raise ValueError(f"block scales must be e4m3 [N, K/16] = [{n}, {k // 16}], got {tuple(w_scales.shape)}")
    check_epilogue("nvfp4_gemm", a, [w_packed, w_scales], row_scale, col_scale, bias, n)


def nvfp4_gemm(a: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, row_scale: torch.Tensor,
               col_scale: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(a [M, K] @ W^T) * (row_scale [M] or scalar * col_scale [N]) + bias [N]`` as ``out_dtype``, where
    ``W = e2m1(w_packed [N, K/2]) * w_scales [N, K/16]`` (no global scale). float32 accumulation."""
    _check(a, w_packed, w_scales, row_scale, col_scale, bias)
    m, k = a.shape
    n = w_packed.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    rs, cs = row_scale.reshape(-1).contiguous(), col_scale.reshape(-1).contiguous()
    args = (a, w_packed, w_scales.view(torch.uint8), rs, cs, cs if bias is None else bias.reshape(-1).contiguous(),
            out, m, n, k, min(triton.next_power_of_2(m), 8192), a.stride(0), a.stride(1), w_packed.stride(0),
            w_scales.stride(0), out.stride(0), out.stride(1), 0 if rs.numel() == 1 else 1)
    if a.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _nvfp4_gemm_tuned[grid](*args, HAS_BIAS=bias is not None, EVEN_K=k % 64 == 0)  # BLOCK_K = 64 in all
    else:
        tile = _INTERPRETER_TILE
        grid = (triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"]),)
        _nvfp4_gemm_kernel[grid](*args, HAS_BIAS=bias is not None, EVEN_K=k % tile["BLOCK_K"] == 0, **tile)
    return out
