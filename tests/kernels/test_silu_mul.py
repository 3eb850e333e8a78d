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


LAUNCH_CONFIGS = [
    {"block": 16384, "num_warps": 16},  # the row in registers (two pieces: 8192 + 4096, or 1024 + 512)
    {"block": 512, "num_warps": 2},  # chunks, two passes
    {"block": 512, "num_warps": 2, "programs_per_sm": 1},  # persistent: 4 programs in the interpreter
    {"block": 16384, "num_warps": 8, "programs_per_sm": 1},
]


@pytest.mark.parametrize("cfg", LAUNCH_CONFIGS)
@pytest.mark.parametrize("t, inter", [(7, 12288), (7, 1500), (1, 1500)])
def test_fp8_epilogue_same_bits_in_every_launch_config(device, monkeypatch, cfg, t, inter):
    """Whole row in registers (block >= width: gate_up read once) or small chunks, one program per row or a
    persistent grid with fewer programs than rows: the codes and scales of the default configuration and of
    the reference, for a NaN row, an all-zero row and a row whose amax underflows to the floor
    (kernels/tuning.py, MIXQUANT_KERNEL_CONFIGS)."""
    x = torch.randn(t, 2 * inter, generator=torch.Generator().manual_seed(inter + t)).half() * 3
    if t > 1:
        x[2, inter - 3] = float("nan")
        x[4] = 0.0
        x[5] *= 1e-5
    x = x.to(device)
    want_q, want_scale = silu_mul_fp8(x)
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"silu_mul_fp8": cfg}))
    q, scale = silu_mul_fp8(x)
    ref_q, ref_scale = fp8_quantize_per_token(silu_mul(x))
    assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(_bits(scale), _bits(want_scale))
    assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(_bits(scale), _bits(ref_scale))
    if t > 1:
        floor = (torch.tensor([1e-12]) / 448).to(device)  # float32, as the kernel divides
        assert scale[2].isnan().all() and torch.equal(scale[4], floor) and torch.equal(scale[5], floor)


def test_kernel_config_override_is_checked(monkeypatch):
    from mixquant_serve.kernels.tuning import config

    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"silu_mul_fp8": {"num_warps": 4},
                                                              "fp8_per_token": {"rows": 2, "programs_per_sm": 8}}))
    assert config("silu_mul_fp8") == {"block": 16384, "num_warps": 4, "programs_per_sm": 0}
    assert config("fp8_per_token") == {"num_warps": 4, "rows": 2, "programs_per_sm": 8}
    assert config("rmsnorm") == {"max_warps": 16}
    for bad in ('{"silu_mul_fp8": {"warps": 4}}', '{"gelu": {}}', '[1]', '{"rmsnorm": {"max_warps": -1}}', "{",
                '{"silu_mul_fp8": {"block": 3000}}', '{"silu_mul_fp8": {"num_warps": 3}}',
                '{"silu_mul_fp8": {"num_warps": 64}}', '{"silu_mul_fp8": {"programs_per_sm": -1}}',
                '{"silu_mul_fp8": {"programs_per_sm": 1.5}}', '{"fp8_per_token": {"rows": 0}}',
                '{"fp8_per_token": {"rows": 3}}', '{"fp8_per_token": {"num_warps": 6}}'):
        monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", bad)
        with pytest.raises(ValueError, match="MIXQUANT_KERNEL_CONFIGS"):
            config("rmsnorm")


def test_persistent_grid_size(device):
    """At most programs_per_sm programs per SM (4 SMs in the interpreter), never more than the rows."""
    from mixquant_serve.kernels.tuning import launch_grid, num_sms

    sms = num_sms(device)
    assert sms == (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4)
    assert launch_grid(10 * sms, 0, device) == 10 * sms and launch_grid(10 * sms, 2, device) == 2 * sms
    assert launch_grid(3, 2, device) == 3


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
