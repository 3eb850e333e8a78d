"""The CUDA paths of the FP8 and NVFP4 methods (Triton activation quantization, Triton scaled GEMM)
against the CPU references. GPU only."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve.layers.forward_context import ForwardContext, forward_context
from mixquant_serve.layers.linear import LinearBase
from mixquant_serve.quant.fp8 import fp8_linear, quantize_fp8_per_channel, quantize_fp8_per_token
from mixquant_serve.quant.nvfp4 import nvfp4_global_scale, nvfp4_matmul, quantize_nvfp4, tensor_amax

pytestmark = pytest.mark.gpu
SIZES = [1024, 256, 256]  # a q/k/v-like merged layer
K = 2048


def _run(layer: LinearBase, precision: str, x: torch.Tensor) -> torch.Tensor:
    with forward_context(ForwardContext(precision, None, None)):
        return layer(x)


def _inputs(t: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(t, K, generator=gen) * torch.exp(2 * torch.randn(t, 1, generator=gen))).to(torch.bfloat16)


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to float32 accumulation order (both runs round the same float32 result to bfloat16)."""
    return torch.allclose(out.float(), ref.float(), rtol=2**-7, atol=1e-4 * ref.float().abs().max().item())


def test_fp8_linear_feeds_scaled_mm_from_the_kernel():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(512, K, generator=gen).to(torch.bfloat16).cuda()
    w_fp8, w_scale = quantize_fp8_per_channel(w)
    x = _inputs(300, 1).cuda()
    out = fp8_linear(x, w_fp8, w_scale, out_dtype=torch.bfloat16)
    x_fp8, x_scale = quantize_fp8_per_token(x)  # the eager reference, on the GPU
    ref = torch._scaled_mm(x_fp8, w_fp8.T, scale_a=x_scale, scale_b=w_scale.reshape(1, -1),
                           out_dtype=torch.bfloat16)
    assert torch.equal(out, ref)  # same operands bit for bit, same GEMM


@pytest.mark.parametrize("cache", ["1", "0"])  # 0: the GEMM reads the packed weight (kernels/nvfp4_gemm.py)
@pytest.mark.parametrize("t", [1, 77, 1000])
def test_nvfp4_method_quantize_at_load_matches_nvfp4_matmul(monkeypatch, t, cache):
    monkeypatch.setenv("MIXQUANT_NVFP4_WEIGHT_CACHE", cache)
    gen = torch.Generator().manual_seed(t)
    w = (torch.randn(sum(SIZES), K, generator=gen) * 0.05).to(torch.bfloat16)
    layer = LinearBase(K, SIZES, True, ("nvfp4",), torch.bfloat16, "cuda")
    for i, n in enumerate(SIZES):
        off = sum(SIZES[:i])
        layer.load("weight", w[off : off + n].cuda(), i)
    bias = torch.randn(sum(SIZES), generator=gen).to(torch.bfloat16)
    layer.load("bias", bias.cuda())
    layer.process_after_loading()
    assert (layer.impls["nvfp4"].alpha is not None) == (cache == "1")  # one global scale: cuBLAS
    x = _inputs(t, t + 1)
    out = _run(layer, "nvfp4", x.cuda()).cpu()
    g = nvfp4_global_scale(tensor_amax(w))
    packed, scales = quantize_nvfp4(w, g)
    ref = (nvfp4_matmul(x, packed, scales, g, out_dtype=torch.float32) + bias.float()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and _close(out, ref)
    one = _run(layer, "nvfp4", x[:1].cuda()).cpu()  # per-token dynamic scale: no dependence on the batch
    assert _close(one, out[:1])


@pytest.mark.parametrize("shared", [False, True])  # one weight scale: cuBLAS with alpha; per shard: Triton
def test_nvfp4_method_static_input_scale(shared):
    gen = torch.Generator().manual_seed(5)
    layer = LinearBase(K, SIZES, False, ("nvfp4",), torch.bfloat16, "cuda")
    parts = []
    for i, n in enumerate(SIZES):
        w = torch.randn(n, K, generator=gen) * (i + 1) * 0.05
        g = torch.tensor(0.2 / 2688) if shared else nvfp4_global_scale(tensor_amax(w))
        packed, bs = quantize_nvfp4(w, g)
        for suffix, tensor in (("weight", packed), ("weight_scale", bs), ("weight_scale_2", g),
                               ("input_scale", torch.tensor(0.003))):
            layer.load(suffix, tensor.cuda(), i)
        parts.append((packed, bs, g))
    layer.process_after_loading()
    assert (layer.impls["nvfp4"].alpha is not None) == shared
    x = _inputs(200, 6)
    out = _run(layer, "nvfp4", x.cuda()).cpu()
    ref = torch.cat([nvfp4_matmul(x, p, bs, g, input_global_scale=torch.tensor(0.003), out_dtype=torch.float32)
                     for p, bs, g in parts], dim=-1).to(torch.bfloat16)
    assert _close(out, ref)


@pytest.mark.parametrize("cache", ["1", "0"])  # 1: cuBLAS on the cached weight; 0: the packed-weight GEMM
@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_apply_rows_is_those_columns_of_apply(monkeypatch, precision, cache):
    """The q rows alone (a qkv projection whose k/v columns run in BF16, --bf16-kv-proj)."""
    monkeypatch.setenv("MIXQUANT_NVFP4_WEIGHT_CACHE", cache)
    gen = torch.Generator().manual_seed(11)
    layer = LinearBase(K, SIZES, True, ("bf16", precision), torch.bfloat16, "cuda")
    for i, n in enumerate(SIZES):
        layer.load("weight", (torch.randn(n, K, generator=gen) * 0.05).to(torch.bfloat16).cuda(), i)
    layer.load("bias", torch.randn(sum(SIZES), generator=gen).to(torch.bfloat16).cuda())
    layer.process_after_loading()
    x = _inputs(129, 12).cuda()
    method, impl = layer.methods[precision], layer.impls[precision]
    full = method.apply(impl, x, layer.bias)
    for sl in (slice(0, SIZES[0]), slice(SIZES[0], None)):
        assert _close(method.apply_rows(impl, x, layer.bias[sl], sl), full[:, sl])
