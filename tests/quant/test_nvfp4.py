"""NVFP4: bit-exact against NVIDIA Model Optimizer's NVFP4QTensor, hand-built cases, the W4A4 GEMM."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve.quant import nvfp4
from mixquant_serve.quant.nvfp4 import (
    BLOCK_SIZE,
    dequantize_nvfp4,
    dequantize_nvfp4_blocks,
    fake_quantize_nvfp4,
    nvfp4_global_scale,
    nvfp4_matmul,
    nvfp4_row_global_scale,
    pack_nibbles,
    pow2_ceil,
    quantize_nvfp4,
    tensor_amax,
    unpack_nibbles,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # E2M1 magnitudes, by the format's definition
E4M3_ONE = 0x38  # 1.0 in E4M3: sign 0, exponent 7 (bias 7), mantissa 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so that -0.0 != +0.0 and NaN == NaN."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


@pytest.fixture(scope="module")
def qtensor():
    return pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor").NVFP4QTensor


@pytest.fixture(scope="module")
def modelopt(qtensor):
    """Model Optimizer's own CPU path: NVFP4QTensor.quantize, then .dequantize (not the fast kernel)."""

    def run(x: torch.Tensor, global_scale: torch.Tensor):
        q, scales, _ = qtensor.quantize(x.clone(), BLOCK_SIZE, weights_scaling_factor_2=global_scale)
        deq = q.dequantize(
            dtype=x.dtype, scale=scales, double_scale=global_scale, block_sizes={-1: BLOCK_SIZE}
        )
        return q._quantized_data, scales, deq

    return run


def _assert_matches_modelopt(modelopt, x: torch.Tensor, global_scale: torch.Tensor) -> None:
    packed, scales = quantize_nvfp4(x, global_scale)
    ref_packed, ref_scales, ref_deq = modelopt(x, global_scale)
    assert packed.shape == (*x.shape[:-1], x.shape[-1] // 2) and packed.dtype == torch.uint8
    assert scales.shape == (*x.shape[:-1], x.shape[-1] // 16) and scales.dtype == torch.float8_e4m3fn
    assert torch.equal(packed, ref_packed)
    assert torch.equal(_bits(scales), _bits(ref_scales))
    assert torch.equal(_bits(dequantize_nvfp4(packed, scales, global_scale, x.dtype)), _bits(ref_deq))


def _heavy_tailed(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=gen))
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (8, 64), (3, 5, 32), (64, 256)])
@pytest.mark.parametrize("scale_factor", [1.0, 0.37, 1e-4, 1e4])
def test_random_tensors_match_modelopt(modelopt, dtype, shape, scale_factor):
    # factors far from 1 push block scales into the 448 clamp (small) or the 2**-9 clamp (large)
    gen = torch.Generator().manual_seed(sum(shape) * 10 + DTYPES.index(dtype))
    x = _heavy_tailed(shape, dtype, gen)
    _assert_matches_modelopt(modelopt, x, nvfp4_global_scale(tensor_amax(x)) * scale_factor)


def _anchored(values: list[float], anchor: float = 6.0) -> torch.Tensor:
    """One block per row: ``values`` then ``anchor`` (the block amax) padded to 16."""
    row = values + [anchor] * (BLOCK_SIZE - len(values))
    return torch.tensor(row, dtype=torch.float64)


BOUNDS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
# Round half to even on the grid: the code of each bound (index into GRID), by the format's rule.
TIES_TO_EVEN = [0, 2, 2, 4, 4, 6, 6]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [1.0, 2.0, 0.125])
def test_rounding_boundaries_round_half_to_even(modelopt, dtype, step):
    # global scale 1 and anchor 6*step make the block scale exactly `step`
    values = [b * step for b in BOUNDS] + [-b * step for b in BOUNDS]
    x = _anchored(values, 6.0 * step).to(dtype)[None]
    codes = unpack_nibbles(quantize_nvfp4(x, torch.tensor(1.0))[0])[0]
    assert codes[:7].tolist() == TIES_TO_EVEN
    assert codes[7:14].tolist() == [8 | c for c in TIES_TO_EVEN]  # -0.25 * step is "negative zero", 0x8
    _assert_matches_modelopt(modelopt, x, torch.tensor(1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_next_to_boundaries(modelopt, dtype):
    bounds = torch.tensor(BOUNDS, dtype=dtype)
    below = torch.nextafter(bounds, torch.zeros_like(bounds))
    above = torch.nextafter(bounds, torch.full_like(bounds, 8.0))
    x = torch.stack([_anchored(below.tolist()), _anchored(above.tolist())]).to(dtype)
    codes = unpack_nibbles(quantize_nvfp4(x, torch.tensor(1.0))[0])
    assert codes[0, :7].tolist() == list(range(7))
    assert codes[1, :7].tolist() == list(range(1, 8))
    _assert_matches_modelopt(modelopt, x, torch.tensor(1.0))


def test_special_blocks(modelopt):
    one = torch.tensor(1.0)
    blocks = {
        "zeros": torch.zeros(BLOCK_SIZE, dtype=torch.float64),
        "negative_zeros": torch.full((BLOCK_SIZE,), -0.0, dtype=torch.float64),
        "grid": _anchored(GRID + [-v for v in GRID[1:]]),
        "negative_zero_in_block": _anchored([-0.0, 0.0, -0.1, 0.1]),
        "scale_rounds_down_saturates": _anchored([6.3, -6.3], anchor=1.0),  # 6.3/6 -> e4m3 1.0
        "clamped_at_448": _anchored([6000.0, 3000.0, -2000.0, 100.0]),  # 1000 -> 448
        "clamped_at_2^-9": _anchored([1e-5, -3e-6, 2e-6], anchor=1e-5),  # 1.7e-6 -> 2**-9
        "subnormal_scale_tie": _anchored([], anchor=6 * 1.5 * 2.0**-9),  # ties to 2**-8
        "outlier": _anchored([1.0] * 14, anchor=1000.0),
    }
    x = torch.stack(list(blocks.values())).float()
    packed, scales = quantize_nvfp4(x, one)
    codes, scale_bits = unpack_nibbles(packed), _bits(scales)
    by_name = {name: i for i, name in enumerate(blocks)}
    for name in ("zeros", "negative_zeros"):
        assert codes[by_name[name]].eq(0).all() and scale_bits[by_name[name], 0] == E4M3_ONE
    assert codes[by_name["grid"], :15].tolist() == list(range(8)) + list(range(9, 16))
    assert codes[by_name["negative_zero_in_block"], :4].tolist() == [0, 0, 8, 0]
    assert codes[by_name["scale_rounds_down_saturates"], :2].tolist() == [7, 15]
    assert scales[by_name["clamped_at_448"], 0].item() == 448.0
    assert codes[by_name["clamped_at_448"], :4].tolist() == [7, 7, 14, 0]  # 13.4, 6.7, -4.46, 0.22
    assert scales[by_name["clamped_at_2^-9"], 0].item() == 2.0**-9
    assert codes[by_name["clamped_at_2^-9"], :3].tolist() == [0, 8, 0]
    assert scales[by_name["subnormal_scale_tie"], 0].item() == 2.0**-8
    assert codes[by_name["outlier"], :14].eq(0).all() and codes[by_name["outlier"], 15] == 7
    _assert_matches_modelopt(modelopt, x, one)
    deq = dequantize_nvfp4(packed, scales, one, torch.float32)
    assert _bits(deq[by_name["negative_zero_in_block"], 2]) == 0  # nibble 0x8 decodes to +0.0


def test_block_scale_at_e4m3_midpoints(modelopt):
    # block_amax / (6 * global_scale) on a midpoint of the E4M3 grid: the order of the float32 ops
    # (6 * global_scale first) and round-half-to-even of the cast decide the scale.
    gen = torch.Generator().manual_seed(8)
    for global_scale in torch.rand(24, generator=gen) * 0.01 + 1e-4:
        amax = torch.tensor([1.0625, 1.1875, 0.53125, 40.0]) * (6.0 * global_scale)
        x = torch.stack([_anchored([0.3 * a.item(), -0.7 * a.item()], anchor=a.item()) for a in amax])
        _assert_matches_modelopt(modelopt, x.float(), global_scale)


def test_nan_block_matches_modelopt(modelopt):
    x = _anchored([float("nan"), 1.0]).float()[None]
    _assert_matches_modelopt(modelopt, x, torch.tensor(1.0))
    assert unpack_nibbles(quantize_nvfp4(x, torch.tensor(1.0))[0]).eq(7).all()


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [[0x21, 0xF3]]
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_nibbles(unpack_nibbles(every_byte)), every_byte)
    assert unpack_nibbles(torch.tensor([0x21, 0xF3], dtype=torch.uint8)).tolist() == [1, 2, 3, 15]


def test_quantize_hand_built_block():
    # block scale 6/(6*1) = 1, so every value is its own code: 0.5 -> 1, -1 -> 0xA, 1.5 -> 3, ...
    x = _anchored([0.5, -1.0, 1.5, -2.0, 3.0, -4.0, 6.0, 0.0]).to(torch.bfloat16)
    packed, scales = quantize_nvfp4(x, torch.tensor(1.0))
    assert packed.tolist()[:4] == [0xA1, 0xC3, 0xE5, 0x07]
    assert packed.tolist()[4:] == [0x77] * 4
    assert _bits(scales).tolist() == [E4M3_ONE]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bounded(dtype):
    gen = torch.Generator().manual_seed(1)
    x = _heavy_tailed((32, 512), dtype, gen)
    scale = nvfp4_global_scale(tensor_amax(x))
    packed, scales = quantize_nvfp4(x, scale)
    deq = dequantize_nvfp4(packed, scales, scale, torch.float32)
    # Largest grid gap is 2 (4 -> 6), and E4M3 rounding of the block scale leaves amax/step <= 6.4,
    # so no element lands farther than one step (block_scale * global_scale) from its value.
    step = (scales.float() * scale).repeat_interleave(BLOCK_SIZE, dim=-1)
    assert ((deq - x.float()).abs() <= step).all()
    assert torch.equal(fake_quantize_nvfp4(x, scale), deq.to(dtype))


def test_grid_values_round_trip_exactly():
    gen = torch.Generator().manual_seed(2)
    grid = torch.tensor(GRID + [-v for v in GRID[1:]])
    x = grid[torch.randint(0, 15, (16, 64), generator=gen)]
    x[:, ::BLOCK_SIZE] = 6.0  # every block's amax is 6: block scale 1
    x = x * 2.0 ** torch.randint(-6, 6, (16, 1), generator=gen)
    scale = torch.tensor(2.0**-3)
    assert torch.equal(fake_quantize_nvfp4(x, scale), x)


def test_chunked_equals_whole(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x = _heavy_tailed((40, 96), torch.bfloat16, gen)
    scale = nvfp4_global_scale(tensor_amax(x))
    whole = quantize_nvfp4(x, scale)
    monkeypatch.setattr(nvfp4, "_CHUNK_ELEMENTS", 3 * 96)
    chunked = quantize_nvfp4(x, scale)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(_bits(whole[1]), _bits(chunked[1]))
    assert torch.equal(dequantize_nvfp4(*whole, scale), dequantize_nvfp4(*chunked, scale))


def test_global_scale_matches_modelopt(qtensor):
    gen = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        for x in _heavy_tailed((64, 32), dtype, gen).unbind(0):
            expected = qtensor.get_weights_scaling_factor_2(x)
            assert _bits(nvfp4_global_scale(tensor_amax(x))) == _bits(expected)


def test_global_scale():
    assert nvfp4_global_scale(torch.tensor(2688.0)).item() == 1.0
    assert nvfp4_global_scale(torch.tensor(0.0)).item() > 0
    x = torch.zeros(2, 32)
    assert fake_quantize_nvfp4(x, nvfp4_global_scale(tensor_amax(x))).eq(0).all()


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        quantize_nvfp4(torch.randn(2, 24), torch.tensor(1.0))
    packed, scales = quantize_nvfp4(torch.randn(2, 32), torch.tensor(1.0))
    with pytest.raises(ValueError):
        dequantize_nvfp4(packed, scales[:, :1], torch.tensor(1.0))
    with pytest.raises(ValueError):
        nvfp4_matmul(torch.randn(3, 64), packed, scales, torch.tensor(1.0))


def _decode_float64(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Independent decoder: nibble -> sign and GRID magnitude, times the block scale, in float64."""
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).long()
    values = torch.tensor(GRID, dtype=torch.float64)[nibbles & 7] * torch.where(nibbles >= 8, -1.0, 1.0)
    return values * scales.double().repeat_interleave(BLOCK_SIZE, dim=-1)


def _check_matmul(x, w_packed, w_scales, w_global, x_global, out):
    """``out`` against float64 on the dequantized operands, within float32 accumulation error."""
    x_packed, x_scales = quantize_nvfp4(x, x_global)
    a = _decode_float64(x_packed, x_scales).reshape(-1, x.shape[-1])
    b = _decode_float64(w_packed, w_scales)
    # a scalar input scale or one per row ([T, 1]); both scales in float64 here
    globals_ = torch.as_tensor(x_global).double().reshape(-1, 1) * float(w_global)
    ref = (a @ b.T) * globals_
    bound = (x.shape[-1] + 4) * 2.0**-24 * (a.abs() @ b.abs().T) * globals_
    assert ((out.reshape(ref.shape).double() - ref).abs() <= bound).all()


@pytest.fixture(scope="module")
def weight():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 128, generator=gen)
    w_global = nvfp4_global_scale(tensor_amax(w))
    return w, *quantize_nvfp4(w, w_global), w_global


def test_matmul_static_input_scale(weight):
    w, w_packed, w_scales, w_global = weight
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x_global = torch.tensor(1.5 / 2688)  # a static scale below this batch's amax: some blocks saturate
    out = nvfp4_matmul(x, w_packed, w_scales, w_global, input_global_scale=x_global, out_dtype=torch.float32)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    _check_matmul(x, w_packed, w_scales, w_global, x_global, out)
    default = nvfp4_matmul(x, w_packed, w_scales, w_global, input_global_scale=x_global)
    assert default.dtype == torch.bfloat16 and torch.equal(default, out.to(torch.bfloat16))


def test_matmul_dynamic_input_scale(weight):
    w, w_packed, w_scales, w_global = weight
    # rows of very different magnitudes: a per-batch scale would push the small rows' blocks to 2**-9
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 128, generator=gen) * 3 * torch.exp(3 * torch.randn(7, 1, generator=gen))
    out = nvfp4_matmul(x, w_packed, w_scales, w_global, out_dtype=torch.float32)
    # one per row: the power of two at or above amax / 2688, computed independently in float64
    x_global = torch.exp2(torch.ceil(torch.log2(x.abs().amax(dim=1, keepdim=True).double() / 2688.0))).float()
    _check_matmul(x, w_packed, w_scales, w_global, x_global, out)
    ref = x @ w.T
    rel = (out - ref).norm(dim=1) / ref.norm(dim=1)
    assert (rel < 0.2).all()  # ~0.095 per operand on Gaussian data, so ~0.13, in every row
    # batch-invariant: each row alone gives the bits it gets in the batch
    for i in range(x.shape[0]):
        assert torch.equal(nvfp4_matmul(x[i : i + 1], w_packed, w_scales, w_global, out_dtype=torch.float32),
                           out[i : i + 1])


def test_per_row_global_scale_is_each_rows_own():
    gen = torch.Generator().manual_seed(10)
    x = _heavy_tailed((6, 64), torch.bfloat16, gen)
    x[2] = 0.0
    scale = nvfp4_row_global_scale(x)
    assert scale.shape == (6, 1) and scale.dtype == torch.float32
    for i in range(6):
        assert _bits(scale[i, 0]) == _bits(pow2_ceil(nvfp4_global_scale(tensor_amax(x[i]))))
        row = quantize_nvfp4(x[i], scale[i, 0])  # a per-row scale quantizes each row as its own tensor
        packed, scales = quantize_nvfp4(x, scale)
        assert torch.equal(packed[i], row[0]) and torch.equal(_bits(scales[i]), _bits(row[1]))
        assert torch.equal(dequantize_nvfp4(packed, scales, scale)[i], dequantize_nvfp4(*row, scale[i, 0]))
    with pytest.raises(ValueError, match="one per row"):
        quantize_nvfp4(x, scale[:5])


def test_matmul_blocks_are_exact(weight):
    _, w_packed, w_scales, _ = weight
    for dtype in (torch.bfloat16, torch.float16):  # the operands are exact in 16-bit floats too
        blocks = dequantize_nvfp4_blocks(w_packed, w_scales, dtype=dtype)
        assert blocks.dtype == dtype and torch.equal(blocks.double(), _decode_float64(w_packed, w_scales))
    assert torch.equal(
        dequantize_nvfp4_blocks(w_packed, w_scales).double(), _decode_float64(w_packed, w_scales)
    )


def test_matmul_empty_batch(weight):
    _, w_packed, w_scales, w_global = weight
    assert nvfp4_matmul(torch.empty(0, 128), w_packed, w_scales, w_global).shape == (0, 48)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(7)
    x = _heavy_tailed((300, 1024), dtype, gen)
    x[0, :16] = 0.0
    x[1, 3] = -0.0
    x[2, :16] = torch.tensor(BOUNDS * 2 + [6.0, 6.0], dtype=dtype)
    gpu_scale = nvfp4_global_scale(tensor_amax(x.cuda()))
    assert _bits(gpu_scale.cpu()) == _bits(nvfp4_global_scale(tensor_amax(x)))
    for scale in (nvfp4_global_scale(tensor_amax(x)), torch.tensor(1e-6), torch.tensor(10.0)):
        cpu = quantize_nvfp4(x, scale)
        gpu = quantize_nvfp4(x.cuda(), scale.cuda())
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(_bits(gpu[1].cpu()), _bits(cpu[1]))
        deq_gpu = dequantize_nvfp4(*gpu, scale.cuda(), dtype).cpu()
        assert torch.equal(_bits(deq_gpu), _bits(dequantize_nvfp4(*cpu, scale, dtype)))
    w_global = nvfp4_global_scale(tensor_amax(x[:64]))
    w_packed, w_scales = quantize_nvfp4(x[:64], w_global)
    out_cpu = nvfp4_matmul(x, w_packed, w_scales, w_global, out_dtype=torch.float32)
    out_gpu = nvfp4_matmul(
        x.cuda(), w_packed.cuda(), w_scales.cuda(), w_global.cuda(), out_dtype=torch.float32
    )
    _check_matmul(x, w_packed, w_scales, w_global, nvfp4_row_global_scale(x), out_gpu.cpu())
    assert torch.allclose(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-6 * out_cpu.abs().max().item())


def test_pow2_ceil():
    gen = torch.Generator().manual_seed(11)
    s = torch.exp(20 * torch.randn(1000, generator=gen)).float()
    s[:4] = torch.tensor([1.0, 0.75, 2.0**-126, 3 * 2.0**-120])
    up = pow2_ceil(s)
    mantissa, _ = torch.frexp(up)
    assert (mantissa == 0.5).all() and (up >= s).all() and (up < 2 * s).all()
    assert up[:4].tolist() == [1.0, 1.0, 2.0**-126, 2.0**-118]
    special = torch.tensor([float("inf"), float("nan")])
    assert pow2_ceil(special)[0] == float("inf") and pow2_ceil(special)[1].isnan()


def test_dynamic_scale_folds_exactly_into_a_bf16_operand():
    """The per-row scale is a power of two: e2m1 * block_scale * scale is exact in bfloat16."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(9, 256, generator=gen) * torch.exp(4 * torch.randn(9, 1, generator=gen))
    scale = nvfp4_row_global_scale(x)
    packed, scales = quantize_nvfp4(x, scale)
    values = dequantize_nvfp4(packed, scales, scale, dtype=torch.float32)
    assert torch.equal(values.to(torch.bfloat16).float(), values)
    # and block scales stay in E4M3's range: the largest block of each row lands in [224, 448]
    assert scales.float().amax(dim=1).ge(224).all() and scales.float().amax(dim=1).le(448).all()
