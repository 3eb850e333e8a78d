"""The Blackwell NVFP4 operands, checked on CPU: FP4 packing, the 128x4 scale swizzle, torch's own
``_scaled_mm`` checks (meta tensors), and ``native_mm`` against ``nvfp4_matmul`` with cuBLAS's FP4 GEMM
emulated from its documented layout (the one boundary we cannot run here)."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve.quant import nvfp4_blackwell
from mixquant_serve.quant.nvfp4 import (
    E2M1_GRID,
    e2m1_decode,
    nvfp4_global_scale,
    nvfp4_matmul,
    nvfp4_row_global_scale,
    quantize_nvfp4,
    tensor_amax,
)
from mixquant_serve.quant.nvfp4_blackwell import as_fp4, native_mm, prepare_weight, swizzle_scales, unswizzle_scales

pytestmark = pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="torch without float4_e2m1fn_x2")


def _random_scales(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 0x7F, (rows, cols), generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn)


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (128, 4), (130, 9), (256, 256), (300, 7)])
def test_swizzle_round_trip(rows, cols):
    s = _random_scales(rows, cols, rows + cols)
    swz = swizzle_scales(s)
    assert swz.dtype == torch.float8_e4m3fn and swz.numel() == -(-rows // 128) * 128 * (-(-cols // 4) * 4)
    assert torch.equal(unswizzle_scales(swz, rows, cols).view(torch.uint8), s.view(torch.uint8))
    assert swz.view(torch.uint8).count_nonzero() == rows * cols  # the padding is zeros


# (row, column) of a [256, 8] scale matrix -> byte offset, by hand: tiles of 128 x 4 in row-major tile
# order (2 tiles per tile row here, 512 bytes each), inside a tile (r % 32) * 16 + (r // 32) * 4 + c
HAND = {(0, 0): 0, (0, 3): 3, (1, 0): 16, (31, 0): 496, (32, 0): 4, (127, 3): 511, (0, 4): 512,
        (128, 0): 1024, (165, 6): 3 * 512 + 5 * 16 + 1 * 4 + 2}


@pytest.mark.parametrize(("pos", "offset"), HAND.items())
def test_swizzle_puts_a_scale_where_the_layout_says(pos, offset):
    s = torch.zeros(256, 8, dtype=torch.uint8)
    s[pos] = 0x38  # 1.0
    swz = swizzle_scales(s.view(torch.float8_e4m3fn)).view(torch.uint8)
    assert swz.nonzero().flatten().tolist() == [offset]


def test_codes_are_standard_e2m1_bits():
    """Nibble = sign | 2 exponent bits (bias 1) | 1 mantissa bit: the FP4 operand needs no re-encoding."""
    nibbles = torch.arange(16, dtype=torch.uint8)
    sign, exp, man = nibbles >> 3, (nibbles >> 1) & 3, (nibbles & 1).float()
    standard = torch.where(exp == 0, man * 0.5, 2.0 ** (exp.float() - 1) * (1 + man / 2)) * (1 - 2 * sign.float())
    assert torch.equal(standard.abs(), e2m1_decode(nibbles).abs()) and torch.equal(standard + 0.0, e2m1_decode(nibbles))
    assert standard[:8].tolist() == list(E2M1_GRID)
    packed = torch.randint(0, 256, (4, 8), dtype=torch.uint8)
    assert torch.equal(as_fp4(packed).view(torch.uint8), packed)  # the same bytes, first element low


def test_torch_accepts_the_operands():
    """torch's own _scaled_mm checks (the meta kernel checks as for CUDA): dtypes, strides, scale sizes."""
    t, n, k = 200, 48, 96
    x_packed, x_scales = quantize_nvfp4(torch.randn(t, k), torch.tensor(0.01))
    w = prepare_weight(*quantize_nvfp4(torch.randn(n, k), torch.tensor(0.01)))
    meta = lambda z: z.to("meta")
    for out_dtype in (torch.float32, torch.bfloat16):
        out = torch._scaled_mm(meta(as_fp4(x_packed)), meta(w.fp4).T, scale_a=meta(swizzle_scales(x_scales)),
                               scale_b=meta(w.scales), out_dtype=out_dtype)
        assert out.shape == (t, n) and out.dtype == out_dtype
    with pytest.raises(RuntimeError, match="blockwise"):  # and it would notice unswizzled scales
        torch._scaled_mm(meta(as_fp4(x_packed)), meta(w.fp4).T, scale_a=meta(x_scales),
                         scale_b=meta(w.scales), out_dtype=torch.float32)


def test_never_selected_off_blackwell():
    assert not nvfp4_blackwell.available(torch.device("cpu"))
    assert nvfp4_blackwell.fits(4096, 12288) and not nvfp4_blackwell.fits(48, 64)


def _emulated_fp4_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """cuBLAS's block-scaled FP4 GEMM by its documentation, in float64: a [M, K/2] fp4, b [K/2, N] fp4."""
    def decode(fp4: torch.Tensor, swizzled: torch.Tensor) -> torch.Tensor:
        codes = fp4.view(torch.uint8)
        nib = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).long()  # first element low
        vals = torch.tensor(E2M1_GRID, dtype=torch.float64)[nib & 7] * (1 - 2 * (nib >> 3)).double()
        rows, blocks = vals.shape[0], vals.shape[1] // 16
        cp = -(-blocks // 4) * 4
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(blocks), indexing="ij")
        offset = ((r // 128) * (cp // 4) + c // 4) * 512 + (r % 32) * 16 + (r % 128) // 32 * 4 + c % 4
        scales = swizzled.view(torch.uint8)[offset].view(torch.float8_e4m3fn).double()
        return vals * scales.repeat_interleave(16, dim=1)

    return (decode(a, scale_a) @ decode(b.T, scale_b).T).to(out_dtype)


@pytest.mark.parametrize("static", [False, True])
def test_native_mm_equals_nvfp4_matmul(monkeypatch, static):
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_fp4_scaled_mm)
    nvfp4_blackwell._gemm_out_dtype.cache_clear()
    gen = torch.Generator().manual_seed(3)
    t, n, k = 150, 32, 96
    w = torch.randn(n, k, generator=gen)
    g_w = nvfp4_global_scale(tensor_amax(w))
    w_packed, w_scales = quantize_nvfp4(w, g_w)
    x = torch.randn(t, k, generator=gen) * torch.exp(torch.randn(t, 1, generator=gen))
    x_scale = torch.tensor(0.002) if static else nvfp4_row_global_scale(x)
    bias = torch.randn(n, generator=gen)
    out = native_mm(*quantize_nvfp4(x, x_scale), prepare_weight(w_packed, w_scales), x_scale,
                    g_w.repeat(n), bias, torch.float32)
    ref = nvfp4_matmul(x, w_packed, w_scales, g_w, x_scale if static else None, out_dtype=torch.float32) + bias
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    nvfp4_blackwell._gemm_out_dtype.cache_clear()
