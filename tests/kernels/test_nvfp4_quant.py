"""The NVFP4 activation quantization kernel against ``quant/nvfp4.py``, bit for bit."""

from __future__ import annotations

import pytest
import torch
from kernels.conftest import ON_GPU

from mixquant_serve.kernels.nvfp4_quant import nvfp4_quantize, nvfp4_quantize_dequantize
from mixquant_serve.quant.nvfp4 import (
    BLOCK_SIZE,
    dequantize_nvfp4,
    dequantize_nvfp4_blocks,
    nvfp4_global_scale,
    nvfp4_row_global_scale,
    quantize_nvfp4,
    tensor_amax,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BOUNDS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # E2M1 rounding boundaries


def _bits(t: torch.Tensor) -> torch.Tensor:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(width)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits where not NaN, NaN at the same places (a NaN's payload changes with each cast)."""
    nan = torch.isnan(a.float())
    return torch.equal(nan, torch.isnan(b.float())) and torch.equal(_bits(a)[~nan], _bits(b)[~nan])


def _check(x: torch.Tensor, global_scale: torch.Tensor | None, out_dtypes=(torch.float32,)) -> None:
    """Both kernel outputs against the reference; None means the per-row dynamic scale."""
    packed, scales, used = nvfp4_quantize(x, global_scale)
    ref_scale = nvfp4_row_global_scale(x) if global_scale is None else global_scale
    ref_packed, ref_scales = quantize_nvfp4(x, ref_scale)
    assert torch.equal(packed, ref_packed) and torch.equal(_bits(scales), _bits(ref_scales))
    assert _same(used.reshape(-1), ref_scale.reshape(-1))
    for dtype in out_dtypes:
        blocks, _ = nvfp4_quantize_dequantize(x, global_scale, out_dtype=dtype)
        assert blocks.dtype == dtype and _same(blocks, dequantize_nvfp4_blocks(ref_packed, ref_scales, dtype))
        if global_scale is None:  # the power-of-two dynamic scale folded into the operand, still exact
            folded, _ = nvfp4_quantize_dequantize(x, None, out_dtype=dtype, fold_global=True)
            assert _same(folded, dequantize_nvfp4(ref_packed, ref_scales, ref_scale, dtype))


def _heavy_tailed(t: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=gen) * torch.exp(3 * torch.randn(t, 1, generator=gen))
    return x.to(dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on NaN rows
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_rows_every_scale_mode(device, dtype):
    x = _heavy_tailed(6, 96, dtype, DTYPES.index(dtype)).to(device)
    x[0, :16] = 0.0  # an all-zero block
    x[1, 16:32] = -0.0
    x[2, 5] = -1e-30  # a tiny negative value: the "negative zero" nibble
    x[3] *= 1e4  # very large
    x[4] *= 1e-4  # very small
    static = nvfp4_global_scale(tensor_amax(x[:4])).to(device)  # float32: row 4 at the 2**-9 clamp; float16: inf
    per_row = torch.rand(6, generator=torch.Generator().manual_seed(9)).to(device) * 0.01 + 1e-5
    for scale, out_dtype in ((None, torch.bfloat16), (static, torch.float16), (per_row, torch.float32)):
        _check(x, scale, (out_dtype,))


def _anchored(values: list[float], anchor: float) -> list[float]:
    return values + [anchor] * (BLOCK_SIZE - len(values))


def _crafted_blocks() -> torch.Tensor:
    """One 16-element block per row, global scale 1: every case Model Optimizer handles specially."""
    rows = [
        [0.0] * 16,
        [-0.0] * 16,
        _anchored([-0.0, 0.0, -0.1, 0.1], 6.0),  # -0.1 -> nibble 0x8
        _anchored([6.3, -6.3], 1.0),  # block scale 6.3/6 rounds down to 1: saturates at +-6
        _anchored([6000.0, 3000.0, -2000.0, 100.0], 100.0),  # block scale clamped at 448
        _anchored([1e-5, -3e-6, 2e-6], 1e-5),  # clamped at 2**-9
        _anchored([], 6 * 1.5 * 2.0**-9),  # a subnormal block scale on a tie
        _anchored([1.0] * 14, 1000.0),  # outlier
        _anchored([float("nan"), 1.0], 6.0),  # NaN: scale NaN, codes 7
    ]
    for step in (1.0, 2.0, 0.125):  # ties of E2M1 rounding at block scale `step`
        rows.append(_anchored([b * step for b in BOUNDS] + [-b * step for b in BOUNDS], 6.0 * step))
    bounds = torch.tensor(BOUNDS)
    rows.append(_anchored(torch.nextafter(bounds, torch.zeros(7)).tolist(), 6.0))  # just below the bounds
    rows.append(_anchored(torch.nextafter(bounds, torch.full((7,), 8.0)).tolist(), 6.0))  # just above
    for mid in (1.0625, 1.1875, 0.53125, 40.0):  # block amax / 6 on a midpoint of the E4M3 grid
        rows.append(_anchored([0.3 * 6 * mid, -0.7 * 6 * mid], 6 * mid))
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_crafted_blocks(device, dtype):
    x = _crafted_blocks().to(dtype).to(device)
    _check(x, torch.tensor(1.0, device=device), (dtype,))


def test_crafted_blocks_side_by_side(device):
    x = _crafted_blocks().to(device)
    wide = torch.cat([x, x.roll(1, 0), x.roll(5, 0)], dim=1)  # several blocks per row, rows rotated
    _check(wide, torch.tensor(0.37, device=device))
    _check(wide, None, (torch.bfloat16,))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on the NaN block
def test_rows_read_in_chunks(device, monkeypatch):
    """Rows longer than one chunk (K > 4096 on the GPU; forced small here): the two-pass path."""
    from mixquant_serve.kernels import nvfp4_quant

    monkeypatch.setattr(nvfp4_quant, "ONE_CHUNK_MAX_BLOCKS", 2)
    monkeypatch.setattr(nvfp4_quant, "CHUNK_BLOCKS", 2)
    x = _heavy_tailed(4, 80, torch.bfloat16, 12).to(device)  # 5 blocks: chunks of 2, 2 and 1
    x[1, 70] = float("nan")  # in the last chunk: the whole row's dynamic scale is NaN
    x[2, 33] = -1e-30
    _check(x, None, (torch.bfloat16,))
    _check(x, torch.rand(4, generator=torch.Generator().manual_seed(1)).to(device) * 0.01)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy: |x| * 2**100 past float32
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_division_free_codes_fall_back_where_they_would_differ(device, dtype):
    """With the dynamic (power-of-two) scale the kernel compares |x| with bound * divisor instead of dividing,
    except in programs where that could differ from the quotient's rounding: a negative x whose quotient rounds
    to -0 (nibble 0, not 8), divisors outside 2**-120..2**120. Rows of one block each, dynamic scale."""
    rows = [
        _anchored([-1e-30, 2e29, -3e29], 1e30),  # -1e-30 / ~1.7e29 underflows to -0: nibble 0
        _anchored([-1e-30, 0.5], 1.0),  # the same value, an ordinary quotient: nibble 8 (no fallback)
        _anchored([3e37, -2e37], 1e37),  # divisors above 2**120
        _anchored([3e-37, -2e-37, 1e-38], 1e-36),  # divisors below 2**-120
    ]
    x = torch.tensor(rows, dtype=torch.float32).to(dtype).to(device)
    _check(x, None, (dtype,))
    packed, _, _ = nvfp4_quantize(x)
    assert packed[0, 0].item() & 0xF == 0x0 and packed[1, 0].item() & 0xF == 0x8


def test_nan_block_and_negative_zero_codes(device):
    x = _crafted_blocks().to(device)
    packed, scales, _ = nvfp4_quantize(x, torch.tensor(1.0, device=device))
    assert _bits(scales)[8, 0].item() == 0x7F and packed[8].eq(0x77).all()
    assert packed[2, 1].item() == 0x08  # (-0.1, 0.1): low nibble 0x8, high nibble 0x0


def test_dynamic_scale_is_per_row(device):
    x = _heavy_tailed(5, 64, torch.bfloat16, 7).to(device)
    packed, scales, used = nvfp4_quantize(x)
    assert used.shape == (5, 1) and used.dtype == torch.float32
    for i in range(5):  # a row alone gives the bits it gets in the batch
        alone = nvfp4_quantize(x[i : i + 1])
        assert torch.equal(alone[0], packed[i : i + 1]) and torch.equal(_bits(alone[1]), _bits(scales[i : i + 1]))


def test_rejects_bad_input(device):
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quantize(torch.randn(2, 24, device=device))
    with pytest.raises(ValueError, match="float32"):
        nvfp4_quantize(torch.randn(2, 32, device=device), torch.tensor(1.0, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="one per row"):
        nvfp4_quantize(torch.randn(3, 32, device=device), torch.ones(2, device=device))
    with pytest.raises(ValueError, match="out_dtype"):
        nvfp4_quantize_dequantize(torch.randn(2, 32, device=device), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="fold_global"):
        nvfp4_quantize_dequantize(torch.randn(2, 32, device=device), torch.tensor(1.0, device=device),
                                  fold_global=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_qwen_shapes_match_cpu_reference(dtype):
    for t, k in ((1, 4096), (300, 4096), (48, 12288)):
        x = _heavy_tailed(t, k, dtype, t + k)
        x[0, :16] = 0.0
        x[-1, 3] = -1e-30
        for scale in (None, nvfp4_global_scale(tensor_amax(x))):
            packed, scales, used = nvfp4_quantize(x.cuda(), None if scale is None else scale.cuda())
            ref_scale = nvfp4_row_global_scale(x) if scale is None else scale
            ref_packed, ref_scales = quantize_nvfp4(x, ref_scale)
            assert torch.equal(packed.cpu(), ref_packed) and torch.equal(_bits(scales.cpu()), _bits(ref_scales))
            assert torch.equal(_bits(used.cpu().reshape(-1)), _bits(ref_scale.reshape(-1)))
            blocks, _ = nvfp4_quantize_dequantize(x.cuda(), None if scale is None else scale.cuda())
            assert torch.equal(blocks.cpu(), dequantize_nvfp4_blocks(ref_packed, ref_scales, torch.bfloat16))
            if scale is None:
                folded, _ = nvfp4_quantize_dequantize(x.cuda(), fold_global=True)
                assert torch.equal(folded.cpu(), dequantize_nvfp4(ref_packed, ref_scales, ref_scale, torch.bfloat16))


@pytest.mark.skipif(ON_GPU, reason="on a GPU every test compiles and launches the kernel")
def test_compiles_for_hopper_with_and_without_the_division():
    """The division-free branch is a run-time `if` per program: the sm_90 compiler must take it (the CPU
    interpreter runs Python's `if`), one row at a time and in chunks."""
    from kernels.hopper_compile import compile_for_hopper

    pointers = dict(x_ptr="bf16", gs_ptr="fp32", packed_ptr="u8", scale_ptr="u8", deq_ptr="bf16")
    specs = [dict(module="mixquant_serve.kernels.nvfp4_quant", kernel="_nvfp4_quant_kernel", pointers=pointers,
                  options=dict(num_warps=8), ints=("K", "gs_stride"), constexprs=dict(
                      DYNAMIC=dynamic, DEQUANT=dequant, FOLD=dynamic and dequant, NB=nb, ONE_CHUNK=nb == 256,
                      AMAX_FLOOR=1e-30, HW=True))
             for dynamic in (True, False) for dequant in (True, False) for nb in (256, 128)]
    specs += [  # the fused producers (their scale is the dynamic power of two)
        dict(module="mixquant_serve.kernels.rmsnorm", kernel="_rmsnorm_kernel", options=dict(num_warps=16),
             pointers=dict(x_ptr="bf16", res_ptr="bf16", out_ptr="bf16", res_out_ptr="bf16", w_ptr="bf16",
                           s_ptr="fp32"), ints=("n_cols", "x_stride", "res_stride"),
             constexprs=dict(HAS_RES=True, BLOCK=4096, QUANT=2, MIN_AMAX=1e-12, AMAX_FLOOR=1e-30, HW=True)),
        dict(module="mixquant_serve.kernels.silu_mul", kernel="_silu_mul_nvfp4_kernel", options=dict(num_warps=8),
             pointers=dict(x_ptr="bf16", out_ptr="bf16", gs_ptr="fp32"), ints=("inter", "x_stride"),
             constexprs=dict(BLOCK=2048, AMAX_FLOOR=1e-30, HW=True)),
    ]
    assert len(compile_for_hopper(specs)) == 10
