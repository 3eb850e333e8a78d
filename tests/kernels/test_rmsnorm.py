"""kernels/rmsnorm.py against the eager RMSNorm layer (Hugging Face's numerics); its FP8 epilogue against
the norm followed by ``fp8_quantize_per_token``, bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import DOT_DTYPES, ON_GPU

from mixquant_serve.kernels.fp8_quant import fp8_quantize_per_token
from mixquant_serve.kernels.nvfp4_quant import nvfp4_quantize_dequantize
from mixquant_serve.kernels.rmsnorm import rmsnorm, rmsnorm_fp8, rmsnorm_nvfp4
from mixquant_serve.layers.norm import RMSNorm


def _layer(n: int, dtype: torch.dtype, device: torch.device) -> RMSNorm:
    norm = RMSNorm(n, 1e-6, dtype).to(device)
    norm.weight.data = torch.randn(n, dtype=dtype, device=device)
    return norm


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("n", [64, 200, 4096] if ON_GPU else [64, 200])
def test_matches_the_eager_layer(device, dtype, n):
    torch.manual_seed(n)
    norm = _layer(n, dtype, device)
    x = torch.randn(7, n, dtype=dtype, device=device) * 3
    out, res = rmsnorm(x, norm.weight, norm.eps)
    assert res is None
    torch.testing.assert_close(out, norm(x), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_fused_residual_add(device, dtype):
    torch.manual_seed(1)
    norm = _layer(96, dtype, device)
    x, r = (torch.randn(2, 5, 96, dtype=dtype, device=device) for _ in range(2))
    x0, r0 = x.clone(), r.clone()
    out, res = rmsnorm(x, norm.weight, norm.eps, residual=r)
    assert torch.equal(res, x0 + r0), "the new residual is the rounded sum"
    torch.testing.assert_close(out, norm(x0 + r0), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
    assert torch.equal(x, x0) and torch.equal(r, r0), "inputs are left alone"


def test_strided_rows_and_empty_input(device):
    norm = _layer(32, torch.float32, device)
    wide = torch.randn(4, 64, device=device)
    out, _ = rmsnorm(wide[:, :32], norm.weight, norm.eps)
    torch.testing.assert_close(out, norm(wide[:, :32].contiguous()))
    empty, _ = rmsnorm(torch.empty(0, 32, device=device), norm.weight, norm.eps)
    assert empty.shape == (0, 32)


def test_refuses_mismatched_shapes(device):
    w = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(torch.randn(2, 16, device=device), w, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(torch.randn(2, 8, device=device), w, 1e-6, residual=torch.randn(3, 8, device=device))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _epilogue_inputs(device, dtype, t: int, n: int, with_residual: bool, seed: int):
    """(norm layer, x, residual or None): rows of very different magnitudes (within float16)."""
    gen = torch.Generator().manual_seed(seed)
    norm = _layer(n, dtype, device)
    mag = torch.exp(3 * torch.randn(t, 1, generator=gen)).clamp(1e-3, 1e3)
    x = (torch.randn(t, n, generator=gen) * mag).to(dtype).to(device)
    r = torch.randn(t, n, generator=gen).to(dtype).to(device) if with_residual else None
    return norm, x, r


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("t, n", [(5, 4096), (3, 12288), (7, 200), (1, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fp8_epilogue_equals_norm_then_quantize(device, dtype, t, n, with_residual):
    norm, x, r = _epilogue_inputs(device, dtype, t, n, with_residual, seed=n + t)
    q, scale, res = rmsnorm_fp8(x, norm.weight, norm.eps, residual=r)
    y, want_res = rmsnorm(x, norm.weight, norm.eps, residual=r)
    want_q, want_scale = fp8_quantize_per_token(y)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (t, n) and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (t, 1) and scale.is_contiguous()
    assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(_bits(scale), _bits(want_scale))
    assert (res is None) == (r is None) and (r is None or torch.equal(res, want_res))


def test_fp8_epilogue_keeps_leading_dims_and_strides(device):
    gen = torch.Generator().manual_seed(5)
    norm = _layer(96, torch.float16, device)
    wide = (torch.randn(2, 3, 160, generator=gen) * 4).half().to(device)
    x, r = wide[..., :96], torch.randn(2, 3, 96, generator=gen).half().to(device)
    q, scale, res = rmsnorm_fp8(x, norm.weight, norm.eps, residual=r)
    assert q.shape == (2, 3, 96) and scale.shape == (2, 3, 1) and res.shape == (2, 3, 96)
    y, want_res = rmsnorm(x.contiguous(), norm.weight, norm.eps, residual=r)
    want_q, want_scale = fp8_quantize_per_token(y.reshape(6, 96))
    assert torch.equal(_bits(q.reshape(6, 96)), _bits(want_q)) and torch.equal(_bits(scale.reshape(6, 1)),
                                                                               _bits(want_scale))
    assert torch.equal(res, want_res)
    q0, s0, res0 = rmsnorm_fp8(torch.empty(0, 96, dtype=torch.float16, device=device), norm.weight, norm.eps)
    assert q0.shape == (0, 96) and s0.shape == (0, 1) and res0 is None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits where not NaN, NaN at the same places."""
    nan = torch.isnan(a.float())
    return torch.equal(nan, torch.isnan(b.float())) and torch.equal(_bits(a)[~nan], _bits(b)[~nan])


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("t, n", [(5, 4096), (3, 12288), (7, 208), (1, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_nvfp4_epilogue_equals_norm_then_quantize_dequantize(device, dtype, t, n, with_residual):
    norm, x, r = _epilogue_inputs(device, dtype, t, n, with_residual, seed=n + t + 1)
    op, scale, res = rmsnorm_nvfp4(x, norm.weight, norm.eps, residual=r)
    y, want_res = rmsnorm(x, norm.weight, norm.eps, residual=r)
    want_op, want_scale = nvfp4_quantize_dequantize(y, None, out_dtype=dtype, fold_global=True)
    assert op.dtype == dtype and op.shape == (t, n) and scale.shape == (t, 1)
    assert _same(op, want_op) and torch.equal(_bits(scale), _bits(want_scale))
    assert (res is None) == (r is None) and (r is None or torch.equal(res, want_res))


def test_nvfp4_epilogue_refuses_rows_not_a_multiple_of_16(device):
    norm = _layer(200, torch.float16, device)
    with pytest.raises(ValueError, match="multiple of 16"):
        rmsnorm_nvfp4(torch.randn(2, 200, device=device).half(), norm.weight, norm.eps)
