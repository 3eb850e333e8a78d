"""kernels/silu_mul.py against the eager gated activation; its FP8 epilogue against silu_mul followed by
``fp8_quantize_per_token``, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOT_DTYPES

from mixquant_serve.kernels.fp8_quant import fp8_quantize_per_token
from mixquant_serve.kernels.nvfp4_quant import nvfp4_quantize_dequantize
from mixquant_serve.kernels.silu_mul import silu_mul, silu_mul_fp8, silu_mul_nvfp4
from mixquant_serve.layers.activation import GatedAct


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("inter", [8, 100, 1500])
def test_matches_eager(device, dtype, inter):
    torch.manual_seed(inter)
    x = torch.randn(3, 2 * inter, dtype=dtype, device=device) * 4
    want = GatedAct("silu")(x)
    got = silu_mul(x)
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
    if dtype != torch.float32:  # the float32 silu may differ in its last bit (exp); rounding hides that
        assert (got == want).float().mean() > 0.98


def test_refuses_odd_width(device):
    with pytest.raises(ValueError, match="even"):
        silu_mul(torch.randn(2, 7, device=device))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("t, inter", [(3, 12288), (5, 4096), (7, 1500), (1, 8)])
def test_fp8_epilogue_equals_silu_mul_then_quantize(device, dtype, t, inter):
    gen = torch.Generator().manual_seed(inter + t)
    # rows of very different magnitudes (products within float16); the first so small that it underflows
    # to the amax floor in float16
    mag = torch.exp(torch.randn(t, 1, generator=gen)).clamp(0.05, 20)
    mag[0] = 1e-5
    x = (torch.randn(t, 2 * inter, generator=gen) * mag).to(dtype).to(device)
    q, scale = silu_mul_fp8(x)
    want_q, want_scale = fp8_quantize_per_token(silu_mul(x))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (t, inter) and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (t, 1) and scale.is_contiguous()
    assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(_bits(scale), _bits(want_scale))


@pytest.mark.parametrize("cfg", [{"block": 16384, "num_warps": 16}, {"block": 512, "num_warps": 2}])
@pytest.mark.parametrize("inter", [12288, 1500])
def test_fp8_epilogue_same_bits_in_every_launch_config(device, monkeypatch, cfg, inter):
    """Whole row in registers (block >= width: gate_up read once) or small chunks: the same codes and scales,
    NaN rows included (kernels/tuning.py, MIXQUANT_KERNEL_CONFIGS)."""
    x = torch.randn(4, 2 * inter, generator=torch.Generator().manual_seed(inter)).half().to(device) * 3
    x[2, inter - 3] = float("nan")
    want_q, want_scale = silu_mul_fp8(x)
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"silu_mul_fp8": cfg}))
    q, scale = silu_mul_fp8(x)
    assert scale[2].isnan().all() and torch.equal(_bits(q), _bits(want_q))
    assert torch.equal(_bits(scale), _bits(want_scale))


def test_kernel_config_override_is_checked(monkeypatch):
    from mixquant_serve.kernels.tuning import config

    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"silu_mul_fp8": {"num_warps": 4}}))
    assert config("silu_mul_fp8") == {"block": 4096, "num_warps": 4} and config("rmsnorm") == {"max_warps": 16}
    for bad in ('{"silu_mul_fp8": {"warps": 4}}', '{"gelu": {}}', '[1]', '{"rmsnorm": {"max_warps": -1}}', "{"):
        monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", bad)
        with pytest.raises(ValueError, match="MIXQUANT_KERNEL_CONFIGS"):
            config("rmsnorm")


def test_fp8_epilogue_keeps_leading_dims_and_strides(device):
    wide = torch.randn(2, 3, 80, generator=torch.Generator().manual_seed(2)).half().to(device) * 3
    x = wide[..., :64]  # row stride 80
    q, scale = silu_mul_fp8(x)
    assert q.shape == (2, 3, 32) and scale.shape == (2, 3, 1)
    want_q, want_scale = fp8_quantize_per_token(silu_mul(x).reshape(6, 32))
    assert torch.equal(_bits(q.reshape(6, 32)), _bits(want_q))
    assert torch.equal(_bits(scale.reshape(6, 1)), _bits(want_scale))
    with pytest.raises(ValueError, match="even"):
        silu_mul_fp8(torch.randn(2, 7, device=device))


def test_fp8_epilogue_nan_in_a_later_chunk(device):
    """The fused kernel reads a row in chunks: a NaN in the last one still makes the row's scale NaN."""
    x = torch.randn(2, 2 * 12288, generator=torch.Generator().manual_seed(3)).half().to(device)
    x[1, 12000] = float("nan")  # gate, past the first chunks
    q, scale = silu_mul_fp8(x)
    want_q, want_scale = fp8_quantize_per_token(silu_mul(x))
    assert scale[1].isnan().all() and not scale[0].isnan().any()
    assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(_bits(scale[0]), _bits(want_scale[0]))


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("t, inter", [(3, 12288), (5, 4096), (2, 1504), (1, 16)])
def test_nvfp4_epilogue_equals_silu_mul_then_quantize_dequantize(device, dtype, t, inter):
    gen = torch.Generator().manual_seed(inter + t + 7)
    mag = torch.exp(torch.randn(t, 1, generator=gen)).clamp(0.05, 20)
    x = (torch.randn(t, 2 * inter, generator=gen) * mag).to(dtype).to(device)
    x[0, 5] = 0.0
    op, scale = silu_mul_nvfp4(x)
    want_op, want_scale = nvfp4_quantize_dequantize(silu_mul(x), None, out_dtype=dtype, fold_global=True)
    assert op.dtype == dtype and op.shape == (t, inter) and scale.shape == (t, 1)
    assert torch.equal(_bits(op), _bits(want_op)) and torch.equal(_bits(scale), _bits(want_scale))
    with pytest.raises(ValueError, match="multiple of 16"):
        silu_mul_nvfp4(torch.randn(2, 40, device=device))
