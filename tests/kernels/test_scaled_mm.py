"""The two NVFP4 GEMM designs: ``scaled_mm`` (dequantized weight) against a float64 reference, and
``nvfp4_gemm`` (packed weight decoded in registers); both, fed by the activation kernel, against
``nvfp4_matmul``."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve.kernels.nvfp4_gemm import nvfp4_gemm
from mixquant_serve.kernels.nvfp4_quant import nvfp4_quantize_dequantize
from mixquant_serve.kernels.scaled_mm import scaled_mm
from mixquant_serve.quant.nvfp4 import (
    dequantize_nvfp4_blocks,
    nvfp4_global_scale,
    nvfp4_matmul,
    quantize_nvfp4,
    tensor_amax,
)

# tl.dot in bfloat16 is wrong in the CPU interpreter (see conftest.py): bfloat16 on the GPU only
DOT_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _reference(a, b, row_scale, col_scale, bias):
    """float64 result and a float32-accumulation error bound for it."""
    scale = row_scale.double().reshape(-1, 1) * col_scale.double().reshape(1, -1)
    ref = (a.double() @ b.double().T) * scale
    bound = (a.shape[1] + 4) * 2.0**-24 * (a.double().abs() @ b.double().abs().T) * scale.abs()
    if bias is not None:
        ref = ref + bias.double()
        bound = bound + 2.0**-24 * ref.abs()
    return ref, bound


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(37, 50, 80), (1, 33, 16), (70, 64, 96)])
def test_matches_float64(device, dtype, m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, k, generator=gen).to(dtype)
    row_scale = torch.rand(m, generator=gen) + 0.5
    col_scale = torch.rand(n, generator=gen) * 1e-3
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    on = lambda *ts: [t.to(device) for t in ts]
    out = scaled_mm(*on(a, b, row_scale, col_scale, bias), out_dtype=torch.float32)
    ref, bound = _reference(a, b, row_scale, col_scale, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert ((out.cpu().double() - ref).abs() <= bound).all()
    # a scalar row scale, no bias, a 16-bit output: one rounding of the float32 result
    out16 = scaled_mm(*on(a, b, torch.tensor(0.5), col_scale), out_dtype=torch.float16)
    ref16, bound16 = _reference(a, b, torch.tensor(0.5), col_scale, None)
    assert ((out16.cpu().double() - ref16).abs() <= bound16 + 2.0**-11 * ref16.abs() + 2.0**-24).all()


def test_strided_operands(device):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(40, 96, generator=gen).to(device)[:, 16:80]  # row stride 96
    b = torch.randn(64, 24, generator=gen).to(device).T  # [24, 64] column-major
    out = scaled_mm(a, b, torch.ones(40, device=device), torch.ones(24, device=device), out_dtype=torch.float32)
    ref, bound = _reference(a.cpu(), b.cpu(), torch.ones(40), torch.ones(24), None)
    assert ((out.cpu().double() - ref).abs() <= bound).all()


def test_nvfp4_operands_give_nvfp4_matmul(device):
    """The CUDA NVFP4 path's arithmetic (kernel quant-dequant, then scaled_mm) equals nvfp4_matmul
    up to float32 accumulation order, with per-row dynamic and static input scales."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=gen)
    w_global = nvfp4_global_scale(tensor_amax(w))
    w_packed, w_scales = quantize_nvfp4(w, w_global)
    w_blocks = dequantize_nvfp4_blocks(w_packed, w_scales, torch.float16).to(device)
    x = torch.randn(9, 64, generator=gen) * torch.exp(2 * torch.randn(9, 1, generator=gen))
    channel = w_global.repeat(48).to(device)
    for x_global in (None, torch.tensor(0.004)):
        x_scale = None if x_global is None else x_global.to(device)
        x_blocks, x_scale = nvfp4_quantize_dequantize(x.to(device), x_scale, out_dtype=torch.float16)
        out = scaled_mm(x_blocks, w_blocks, x_scale, channel, out_dtype=torch.float32).cpu()
        ref = nvfp4_matmul(x, w_packed, w_scales, w_global, x_global, out_dtype=torch.float32)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k", "static"), [(19, 50, 80, False), (20, 32, 64, True), (1, 33, 16, False)])
def test_packed_weight_gemm_gives_nvfp4_matmul(device, dtype, m, n, k, static):
    gen = torch.Generator().manual_seed(m + n + k)
    w = torch.randn(n, k, generator=gen)
    w_global = nvfp4_global_scale(tensor_amax(w))
    w_packed, w_scales = quantize_nvfp4(w, w_global)
    x = torch.randn(m, k, generator=gen) * torch.exp(2 * torch.randn(m, 1, generator=gen))
    x_global = torch.tensor(0.004) if static else None
    bias = torch.randn(n, generator=gen)
    x_blocks, x_scale = nvfp4_quantize_dequantize(x.to(device), None if x_global is None else x_global.to(device),
                                                  out_dtype=dtype)
    on = lambda *ts: [t.to(device) for t in ts]
    out = nvfp4_gemm(x_blocks, *on(w_packed, w_scales), x_scale, *on(w_global.repeat(n), bias),
                     out_dtype=torch.float32).cpu()
    ref = nvfp4_matmul(x, w_packed, w_scales, w_global, x_global, out_dtype=torch.float32) + bias
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_packed_weight_decoding_every_scale_byte(device):
    """Every finite E4M3 scale byte (subnormals included) and every nibble, decoded in the kernel's
    registers, against the reference decoder: a GEMM with identity-like activations reads W back."""
    gen = torch.Generator().manual_seed(4)
    scale_bytes = torch.arange(256, dtype=torch.uint8)
    scale_bytes = scale_bytes[(scale_bytes & 0x7F) != 0x7F]  # 254 finite scales
    n, k = 64, 64  # 4 blocks per row: 256 scale slots, every finite byte at least once
    w_scales = scale_bytes[torch.randperm(256, generator=gen) % scale_bytes.numel()].reshape(n, k // 16)
    w_scales = w_scales.view(torch.float8_e4m3fn)
    w_packed = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    eye = torch.eye(k, dtype=torch.float32)  # out[i, j] = W[j, i]
    out = nvfp4_gemm(*[t.to(device) for t in (eye, w_packed, w_scales, torch.tensor(1.0), torch.ones(n))],
                     out_dtype=torch.float32).cpu()
    assert torch.equal(out.T, dequantize_nvfp4_blocks(w_packed, w_scales, torch.float32))


def test_rejects_bad_input(device):
    a = torch.randn(4, 32, device=device)
    ones = lambda n: torch.ones(n, device=device)
    with pytest.raises(ValueError, match="want a"):
        scaled_mm(a, torch.randn(8, 16, device=device), ones(4), ones(8))
    with pytest.raises(ValueError, match="share"):
        scaled_mm(a, torch.randn(8, 32, device=device).half(), ones(4), ones(8))
    with pytest.raises(ValueError, match="row_scale"):
        scaled_mm(a, torch.randn(8, 32, device=device), ones(3), ones(8))
    with pytest.raises(ValueError, match="col_scale"):
        scaled_mm(a, torch.randn(8, 32, device=device), ones(4), ones(8).double())
    assert scaled_mm(a[:0], torch.randn(8, 32, device=device), ones(1), ones(8)).shape == (0, 8)
    packed = torch.zeros(8, 16, dtype=torch.uint8, device=device)
    scales = torch.zeros(8, 2, device=device).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="packed weight"):
        nvfp4_gemm(a, packed[:, :8], scales, ones(4), ones(8))
    with pytest.raises(ValueError, match="block scales"):
        nvfp4_gemm(a, packed, scales.float(), ones(4), ones(8))


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "n", "k"), [(1, 4096, 4096), (300, 6144, 4096), (2048, 4096, 12288)])
def test_gpu_bf16_qwen_shapes(m, n, k):
    gen = torch.Generator().manual_seed(m)
    a = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    rs, cs, bias = torch.rand(m, generator=gen), torch.rand(n, generator=gen), torch.randn(n, generator=gen)
    out = scaled_mm(a.cuda(), b.cuda(), rs.cuda(), cs.cuda(), bias.cuda(), out_dtype=torch.float32).cpu()
    ref, bound = _reference(a, b, rs, cs, bias)
    assert ((out.double() - ref).abs() <= bound).all()


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "n", "k"), [(1, 4096, 4096), (300, 6144, 4096), (2048, 4096, 12288)])
def test_gpu_both_designs_agree_at_qwen_shapes(m, n, k):
    gen = torch.Generator().manual_seed(m + 1)
    w = torch.randn(n, k, generator=gen) * 0.05
    w_global = nvfp4_global_scale(tensor_amax(w))
    w_packed, w_scales = (t.cuda() for t in quantize_nvfp4(w, w_global))
    x = (torch.randn(m, k, generator=gen) * torch.exp(2 * torch.randn(m, 1, generator=gen))).to(torch.bfloat16)
    x_blocks, x_scale = nvfp4_quantize_dequantize(x.cuda())
    channel = w_global.repeat(n).cuda()
    packed_out = nvfp4_gemm(x_blocks, w_packed, w_scales, x_scale, channel, out_dtype=torch.float32).cpu()
    w_blocks = dequantize_nvfp4_blocks(w_packed, w_scales, torch.bfloat16)
    cached_out = scaled_mm(x_blocks, w_blocks, x_scale, channel, out_dtype=torch.float32).cpu()
    ref = nvfp4_matmul(x, w_packed.cpu(), w_scales.cpu(), w_global, out_dtype=torch.float32)
    for out in (packed_out, cached_out):
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
