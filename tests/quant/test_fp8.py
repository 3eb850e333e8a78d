"""FP8 W8A8: scales and codes against float64, torch._scaled_mm against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve.quant import fp8
from mixquant_serve.quant.fp8 import (
    FP8_DTYPE,
    fp8_linear,
    fp8_linear_reference,
    fp8_scaled_mm,
    quantize_fp8_per_channel,
    quantize_fp8_per_token,
)

OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _spread(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian rows whose magnitudes span several orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.exp(2 * torch.randn(rows, 1, generator=gen))
    return x.to(dtype)


def _codes_float64(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.double() / scale.double()).clamp(-448, 448).to(FP8_DTYPE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_channel_scales_and_codes_exact(dtype):
    w = _spread(64, 96, seed=0, dtype=dtype)
    w[3] = 0.0
    w_fp8, scale = quantize_fp8_per_channel(w)
    assert w_fp8.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (64,)
    assert torch.equal(scale, (w.double().abs().amax(dim=1).clamp_min(1e-12) / 448).float())
    assert torch.equal(w_fp8.view(torch.uint8), _codes_float64(w, scale[:, None]).view(torch.uint8))
    assert scale[3] > 0 and w_fp8[3].float().eq(0).all()
    assert w_fp8.float().abs().amax(dim=1)[torch.arange(64) != 3].eq(448).all()


def test_per_token_scales_and_codes_exact():
    x = _spread(2 * 3 * 5, 64, seed=1, dtype=torch.bfloat16).reshape(2, 15, 64)
    x_fp8, scale = quantize_fp8_per_token(x)
    assert x_fp8.shape == x.shape and scale.shape == (2, 15, 1) and scale.dtype == torch.float32
    assert torch.equal(scale, (x.double().abs().amax(dim=-1, keepdim=True) / 448).float())
    assert torch.equal(x_fp8.view(torch.uint8), _codes_float64(x, scale).view(torch.uint8))


def test_tiny_amax_has_no_nan():
    x = torch.zeros(3, 32)
    x[1, 0] = 1e-30
    x_fp8, scale = quantize_fp8_per_token(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.isfinite(x_fp8.float()).all()
    w_fp8, w_scale = quantize_fp8_per_channel(torch.zeros(16, 32))
    assert fp8_linear(x, w_fp8, w_scale).eq(0).all()


@pytest.fixture(scope="module")
def weight():
    w = _spread(48, 128, seed=2) / 10
    bias = torch.randn(48, generator=torch.Generator().manual_seed(3))
    return w, *quantize_fp8_per_channel(w), bias


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(weight, out_dtype, with_bias):
    w, w_fp8, w_scale, bias = weight
    x = _spread(2 * 7, 128, seed=4, dtype=torch.bfloat16).reshape(2, 7, 128)
    b = bias if with_bias else None
    out = fp8_linear(x, w_fp8, w_scale, bias=b, out_dtype=out_dtype)
    ref = fp8_linear_reference(x, w_fp8, w_scale, bias=b, out_dtype=out_dtype)
    assert out.shape == (2, 7, 48) and out.dtype == out_dtype
    ulp = torch.finfo(out_dtype).eps
    assert torch.allclose(out.float(), ref.float(), rtol=2 * ulp, atol=1e-6 * ref.abs().max().item())


def test_linear_float32_against_float64(weight):
    w, w_fp8, w_scale, bias = weight
    x = _spread(9, 128, seed=5)
    out = fp8_linear(x, w_fp8, w_scale, bias=bias, out_dtype=torch.float32)
    x_fp8, x_scale = quantize_fp8_per_token(x)
    a = x_fp8.double() * x_scale.double()
    b = w_fp8.double() * w_scale.double()[:, None]
    ref = a @ b.T + bias.double()
    bound = (128 + 4) * 2.0**-24 * (a.abs() @ b.abs().T + bias.double().abs())
    assert ((out.double() - ref).abs() <= bound).all()


def test_linear_close_to_full_precision(weight):
    w, w_fp8, w_scale, _ = weight
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(6))
    out, ref = fp8_linear(x, w_fp8, w_scale), x @ w.T
    assert out.dtype == torch.float32
    # E4M3 keeps 4 significant bits: ~2.5% RMS rounding error per operand, so ~3.5% together
    assert (out - ref).norm() / ref.norm() < 0.06


def test_linear_empty_batch_and_bad_shapes(weight):
    _, w_fp8, w_scale, _ = weight
    assert fp8_linear(torch.empty(0, 128), w_fp8, w_scale).shape == (0, 48)
    with pytest.raises(ValueError):
        fp8_linear(torch.randn(2, 64), w_fp8, w_scale)
    with pytest.raises(ValueError):
        fp8_linear(torch.randn(2, 128), w_fp8, w_scale[:5])


@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_of_a_quantized_input_is_fp8_linear(weight, with_bias):
    """The GEMM alone, on an activation its producer quantized ([..., K] codes, [..., 1] scales)."""
    _, w_fp8, w_scale, bias = weight
    x = _spread(2 * 5, 128, seed=9, dtype=torch.bfloat16).reshape(2, 5, 128)
    b = bias if with_bias else None
    x_fp8, x_scale = quantize_fp8_per_token(x)
    out = fp8_scaled_mm(x_fp8, x_scale, w_fp8, w_scale, b, torch.bfloat16)
    assert out.shape == (2, 5, 48) and torch.equal(out, fp8_linear(x, w_fp8, w_scale, b, torch.bfloat16))
    assert fp8_scaled_mm(x_fp8[:0], x_scale[:0], w_fp8, w_scale, b, torch.bfloat16).shape == (0, 5, 48)
    with pytest.raises(ValueError, match="scales"):
        fp8_scaled_mm(x_fp8, x_scale.double(), w_fp8, w_scale, b, torch.bfloat16)
    with pytest.raises(ValueError, match="codes"):
        fp8_scaled_mm(x, x_scale, w_fp8, w_scale, b, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_linear_matches_reference(out_dtype, with_bias):
    w = _spread(256, 512, seed=7) / 10  # outputs stay well inside float16's range
    w_fp8, w_scale = quantize_fp8_per_channel(w)
    w_fp8_gpu, w_scale_gpu = quantize_fp8_per_channel(w.cuda())
    assert torch.equal(w_fp8_gpu.cpu().view(torch.uint8), w_fp8.view(torch.uint8))
    assert torch.equal(w_scale_gpu.cpu(), w_scale)
    x = (_spread(33, 512, seed=8) / 10).to(torch.bfloat16).cuda()
    b = torch.randn(256, device="cuda") if with_bias else None
    out = fp8_linear(x, w_fp8_gpu, w_scale_gpu, bias=b, out_dtype=out_dtype).float()
    ref = fp8_linear_reference(x, w_fp8_gpu, w_scale_gpu, bias=b, out_dtype=torch.float32)
    # Hopper's FP8 tensor cores keep only ~14 bits while accumulating inside a K tile (promoted to
    # float32 between tiles), so bound the error by the magnitude of the products, not of the sum.
    x_fp8, x_scale = quantize_fp8_per_token(x)
    products = (x_fp8.float() * x_scale).abs() @ (w_fp8_gpu.float() * w_scale_gpu[:, None]).abs().T
    bound = 2.0**-10 * products + torch.finfo(out_dtype).eps * ref.abs()
    assert ((out - ref).abs() <= bound).all()


def test_cpu_uses_scaled_mm_where_torch_has_it():
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version >= (2, 13):
        assert fp8._cpu_rowwise_scaled_mm()


@pytest.fixture
def fast_accum():
    fp8.set_fast_accumulation(True)
    yield
    fp8.set_fast_accumulation(False)


def test_fast_accumulation_changes_nothing_on_cpu(weight, fast_accum):
    assert fp8.fast_accumulation()
    w, w_fp8, w_scale, _ = weight
    x = _spread(9, w.shape[1], seed=3).to(torch.bfloat16)
    fp8.set_fast_accumulation(False)
    precise = fp8_linear(x, w_fp8, w_scale)
    fp8.set_fast_accumulation(True)
    assert torch.equal(fp8_linear(x, w_fp8, w_scale), precise)


@pytest.mark.gpu
def test_cuda_fast_accumulation_stays_close(fast_accum):
    """Without float32 promotion the partial sums of a K=4096 product keep ~14 bits throughout: the error
    grows with K, but stays a small multiple of the products' magnitude times 2**-10."""
    w = _spread(256, 4096, seed=9).cuda() / 10
    w_fp8, w_scale = quantize_fp8_per_channel(w)
    x = (_spread(65, 4096, seed=10) / 10).to(torch.bfloat16).cuda()
    out = fp8_linear(x, w_fp8, w_scale, out_dtype=torch.float32)
    ref = fp8_linear_reference(x, w_fp8, w_scale, out_dtype=torch.float32)
    x_fp8, x_scale = quantize_fp8_per_token(x)
    products = (x_fp8.float() * x_scale).abs() @ (w_fp8.float() * w_scale[:, None]).abs().T
    assert ((out - ref).abs() <= 2.0**-7 * products).all()
    assert (out - ref).norm() / ref.norm() < 1e-2
