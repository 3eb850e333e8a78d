"""FP8 (E4M3) W8A8: per-output-channel weight scales, dynamic per-token activation scales.

Scales are float32 and multiply to dequantize: ``value = fp8 * scale`` with ``scale = absmax / 448``.
``fp8_linear`` runs ``torch._scaled_mm`` with row-wise scales (CPU and CUDA); on CUDA it needs K and
N to be multiples of 16, and the activation is quantized by one Triton kernel
(``kernels/fp8_quant.py``, bit-identical to ``quantize_fp8_per_token``) instead of a chain of eager ops.
``fp8_scaled_mm`` is the GEMM alone, for an activation that its producer quantized (the fused RMSNorm and
SiLU-mul kernels).
``fp8_linear_reference`` is the same math in plain float32 for tests.

Fast accumulation (``set_fast_accumulation``, the engine's --fp8-fast-accum): on Hopper the FP8 tensor cores
accumulate in reduced precision unless the GEMM promotes partial sums to float32 every few K steps; cuBLAS's
``use_fast_accum`` skips the promotion (what the FP8 GEMMs of vLLM's and SGLang's CUTLASS kernels do). A
process-wide switch, like ``torch.backends.cuda.matmul.allow_tf32``; it changes nothing on CPU.
"""

from __future__ import annotations

from functools import lru_cache

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# An absmax below this is raised to it, so an all-zero row gets a positive scale (and codes of zero).
MIN_AMAX = 1e-12
_fast_accum = False


def set_fast_accumulation(on: bool) -> None:
    """Whether CUDA FP8 GEMMs skip the float32 promotion of partial sums (faster, less precise)."""
    global _fast_accum
    _fast_accum = bool(on)


def fast_accumulation() -> bool:
    return _fast_accum


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.float().clamp_min(MIN_AMAX)
    # A tensor divisor, so CUDA divides too (by a Python number it multiplies by the reciprocal).
    return amax / amax.new_full((), FP8_MAX)


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


@torch.no_grad()
def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[N, K]`` to ``(w_fp8 [N, K], scale [N] float32)``, scale = row absmax / 448.

    Rows are converted a slice at a time, so a large weight needs no full float32 copy.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"want a 2-D floating-point weight, got {tuple(w.shape)} {w.dtype}")
    scale = _scale_from_amax(w.abs().amax(dim=1))
    w_fp8 = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    step = max(1, (1 << 22) // max(1, w.shape[1]))
    for start in range(0, w.shape[0], step):
        part = slice(start, start + step)
        w_fp8[part] = _to_fp8(w[part], scale[part, None])
    return w_fp8, scale


@torch.no_grad()
def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation ``[..., K]`` to ``(x_fp8 [..., K], scale [..., 1] float32)``, one scale per row."""
    if not x.is_floating_point():
        raise TypeError(f"want a floating-point activation, got {x.dtype}")
    scale = _scale_from_amax(x.abs().amax(dim=-1, keepdim=True))
    return _to_fp8(x, scale), scale


def _check_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor) -> None:
    if w_fp8.dtype != FP8_DTYPE or w_fp8.dim() != 2 or w_fp8.shape[1] != x.shape[-1]:
        raise ValueError(f"weight {tuple(w_fp8.shape)} {w_fp8.dtype} does not fit input {tuple(x.shape)}")
    if w_scale.shape != (w_fp8.shape[0],):
        raise ValueError(f"weight scale must be [N]={w_fp8.shape[0]}, got {tuple(w_scale.shape)}")


@torch.no_grad()
def fp8_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` with ``W = w_fp8 [N, K] * w_scale [N, 1]``; returns ``[..., N]``.

    ``x`` is quantized per token at run time, then multiplied by ``fp8_scaled_mm``. ``out_dtype``
    defaults to the dtype of ``x``. On a CPU torch whose ``_scaled_mm`` lacks row-wise scales it runs
    ``fp8_linear_reference``.
    """
    _check_linear(x, w_fp8, w_scale)
    out_dtype = out_dtype or x.dtype
    rows = x.reshape(-1, x.shape[-1])
    n = w_fp8.shape[0]
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n, dtype=out_dtype)
    if x.device.type == "cpu" and not _cpu_rowwise_scaled_mm():
        return fp8_linear_reference(x, w_fp8, w_scale, bias, out_dtype)
    x_fp8, x_scale = _quantize_activation(rows)
    return fp8_scaled_mm(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype).reshape(*x.shape[:-1], n)


@torch.no_grad()
def fp8_scaled_mm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(x_fp8 [..., K] * x_scale [..., 1]) @ W^T (+ bias)``: ``fp8_linear`` of an activation already
    quantized per token (by ``fp8_linear`` itself, or by a fused RMSNorm / SiLU-mul kernel).

    ``torch._scaled_mm`` wants the first operand row-major, the second column-major (``w_fp8.T`` of a
    contiguous weight), and row-wise float32 scales of shapes ``[T, 1]`` and ``[1, N]``, both contiguous.
    With a bias the GEMM writes float32 and the bias is added before the cast (CUDA refuses a fused bias
    with float32 output).
    """
    _check_linear(x_fp8, w_fp8, w_scale)
    if x_fp8.dtype != FP8_DTYPE or x_scale.dtype != torch.float32 or x_scale.shape != (*x_fp8.shape[:-1], 1):
        raise ValueError(f"want float8_e4m3fn codes [..., K] and float32 scales [..., 1], got {x_fp8.dtype} "
                         f"{tuple(x_fp8.shape)} and {x_scale.dtype} {tuple(x_scale.shape)}")
    n = w_fp8.shape[0]
    rows, scales = x_fp8.reshape(-1, x_fp8.shape[-1]), x_scale.reshape(-1, 1)
    if rows.shape[0] == 0:
        out = torch.empty(0, n, dtype=out_dtype, device=x_fp8.device)
    elif x_fp8.device.type == "cpu" and not _cpu_rowwise_scaled_mm():
        out = _dequantized_mm(rows, scales, w_fp8, w_scale, bias, out_dtype)
    else:
        out = torch._scaled_mm(
            rows.contiguous(),
            w_fp8.contiguous().T,
            scale_a=scales.contiguous(),
            scale_b=w_scale.float().reshape(1, n).contiguous(),
            out_dtype=out_dtype if bias is None else torch.float32,
            use_fast_accum=_fast_accum and rows.is_cuda,
        )
        if bias is not None:
            out = (out + bias.float()).to(out_dtype)
    return out.reshape(*x_fp8.shape[:-1], n)


def _quantize_activation(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8_per_token`` of ``[T, K]``; on CUDA by the fused Triton kernel (same bits)."""
    if rows.is_cuda:
        from mixquant_serve.kernels.fp8_quant import fp8_quantize_per_token

        return fp8_quantize_per_token(rows.contiguous())
    return quantize_fp8_per_token(rows)


@lru_cache(maxsize=1)
def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (2.13 does, 2.11 does not)."""
    a = torch.ones(16, 16, dtype=FP8_DTYPE)
    try:
        torch._scaled_mm(
            a, a.T, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32
        )
    except RuntimeError:
        return False
    return True


@torch.no_grad()
def fp8_linear_reference(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``fp8_linear`` in plain PyTorch: dequantize both operands, float32 matmul, bias, cast."""
    _check_linear(x, w_fp8, w_scale)
    x_fp8, x_scale = quantize_fp8_per_token(x)
    return _dequantized_mm(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype or x.dtype)


def _dequantized_mm(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    out = (x_fp8.float() * x_scale) @ (w_fp8.float() * w_scale.float()[:, None]).T
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
