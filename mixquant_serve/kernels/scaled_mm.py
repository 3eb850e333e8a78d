"""Scaled GEMM in Triton: ``out = cast((a @ b^T) * (row_scale * col_scale) + bias)``, float32 inside.

The emulated NVFP4 linear: ``a`` is the activation's exact ``e2m1 * block_scale`` (``nvfp4_quant.py``),
``b`` the weight's (cached by the method), both bfloat16 on the GPU; the products accumulate in float32
and both global scales are applied once in the epilogue (the two scales are multiplied first, in float32,
as ``NVFP4Method``'s reference does), so no float32 ``[M, N]`` goes through memory.

Tiles are sized for Hopper (128 x 128/256 x 64, 3-4 stages, 8 warps, grouped launch order so that
neighbouring programs reuse ``b`` tiles from L2), autotuned per (M bucket, N, K) on CUDA. float32
operands use IEEE float32 products (never TF32). Under Triton's CPU interpreter a fixed small tile runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.fp8_quant import check_triton_device

_OPERAND_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def scaled_epilogue(acc, rm, rn, M, N, rs_ptr, rs_stride, cs_ptr, bias_ptr, c_ptr, stride_cm, stride_cn,
                    HAS_BIAS: tl.constexpr):
    """Store ``acc * (row_scale * col_scale) + bias`` (the scales multiplied first, in float32) as c's dtype."""
    row_scale = tl.load(rs_ptr + rm * rs_stride, mask=rm < M, other=0.0)
    col_scale = tl.load(cs_ptr + rn, mask=rn < N, other=0.0)
    acc = acc * (row_scale[:, None] * col_scale[None, :])
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M tile rows at a time (L2 reuse of b's tiles)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def _scaled_mm_kernel(a_ptr, b_ptr, rs_ptr, cs_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, rs_stride,
                      HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past M / columns past N read wrapped-around rows (in bounds, no mask) and are never stored
    am = rm % M
    bn = rn % N
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee") if IEEE else tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    scaled_epilogue(acc, rm, rn, M, N, rs_ptr, rs_stride, cs_ptr, bias_ptr, c_ptr, stride_cm, stride_cn, HAS_BIAS)


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages,
                         num_warps=warps)


_HOPPER_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 64, 3, 4),
    _config(64, 128, 64, 4, 4),  # few rows (short prompts)
]
_scaled_mm_tuned = triton.autotune(configs=_HOPPER_CONFIGS, key=["M_BUCKET", "N", "K"])(_scaled_mm_kernel)
_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def _check(a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"want a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _OPERAND_DTYPES or out_dtype not in _OUT_DTYPES:
        raise ValueError(f"operands must share a float16/bfloat16/float32 dtype, got {a.dtype}, {b.dtype} "
                         f"-> {out_dtype}")
    check_epilogue("scaled_mm", a, [b], row_scale, col_scale, bias, b.shape[0])


def check_epilogue(name: str, a: torch.Tensor, weights: list[torch.Tensor], row_scale: torch.Tensor,
                   col_scale: torch.Tensor, bias: torch.Tensor | None, n: int) -> None:
    """The checks of what `scaled_epilogue` reads (scales, bias) and of the devices, shared by the GEMMs."""
    m = a.shape[0]
    if row_scale.dtype != torch.float32 or row_scale.numel() not in (1, m):
        raise ValueError(f"row_scale must be float32, a scalar or [M]={m}, got {tuple(row_scale.shape)} "
                         f"{row_scale.dtype}")
    if col_scale.dtype != torch.float32 or col_scale.numel() != n:
        raise ValueError(f"col_scale must be float32 [N]={n}, got {tuple(col_scale.shape)} {col_scale.dtype}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must be [N]={n}, got {tuple(bias.shape)}")
    tensors = [a, *weights, row_scale, col_scale] + ([] if bias is None else [bias])
    if any(t.device != a.device for t in tensors):
        raise ValueError(f"{name} needs every tensor on one device")
    check_triton_device(a)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(a [M, K] @ b [N, K]^T) * (row_scale [M] or scalar * col_scale [N]) + bias [N]`` as ``out_dtype``.

    Float32 accumulation, scales and bias; one rounding to ``out_dtype`` at the end.
    """
    _check(a, b, row_scale, col_scale, bias, out_dtype)
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(torch.zeros(m, n, device=a.device) + (0 if bias is None else bias.float()))
    rs = row_scale.reshape(-1).contiguous()
    cs = col_scale.reshape(-1).contiguous()
    args = (a, b, rs, cs, cs if bias is None else bias.reshape(-1).contiguous(), out, m, n, k,
            min(triton.next_power_of_2(m), 8192), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), 0 if rs.numel() == 1 else 1)
    flags = dict(HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32)
    if a.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _scaled_mm_tuned[grid](*args, **flags, EVEN_K=k % 64 == 0)  # every config has BLOCK_K = 64
    else:
        tile = _INTERPRETER_TILE
        grid = (triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"]),)
        _scaled_mm_kernel[grid](*args, **flags, EVEN_K=k % tile["BLOCK_K"] == 0, **tile)
    return out
