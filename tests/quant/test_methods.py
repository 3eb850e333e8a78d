"""Quantization methods on real linear layers: loading (shards, checkpoints, quantize-at-load), the GEMM
against the exact NVFP4/FP8 functions, completeness checks and the memory they report."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve.layers.forward_context import ForwardContext, forward_context
from mixquant_serve.layers.linear import LinearBase
from mixquant_serve.quant.fp8 import fp8_linear, quantize_fp8_per_channel, quantize_fp8_per_token
from mixquant_serve.quant.fp8_method import FP8Method
from mixquant_serve.quant.methods import (
    FP8_PER_TOKEN,
    GEMV_PROLOGUE,
    QuantizedActivation,
    Unquantized,
    create_quant_method,
)
from mixquant_serve.quant.nvfp4 import (
    fake_quantize_nvfp4,
    nvfp4_global_scale,
    nvfp4_matmul,
    nvfp4_row_global_scale,
    quantize_nvfp4,
    tensor_amax,
)
from mixquant_serve.quant.nvfp4_method import NVFP4Method

SIZES = [64, 32, 32]  # a q/k/v-like merged layer
K = 96


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _merged(precisions, dtype=torch.float32, sizes=SIZES, bias=False) -> LinearBase:
    return LinearBase(K, sizes, bias, precisions, dtype, "cpu")


def _weight(seed: int = 0, sizes=SIZES) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # rows of very different magnitude, so that shard-local and merged global scales differ
    w = torch.randn(sum(sizes), K, generator=gen) * torch.exp(torch.randn(sum(sizes), 1, generator=gen))
    return w.to(torch.bfloat16)


def _load_shards(layer: LinearBase, w: torch.Tensor, order=(2, 0, 1)) -> None:
    for i in order:
        off = sum(layer.output_sizes[:i])
        layer.load("weight", w[off : off + layer.output_sizes[i]], i)
    layer.process_after_loading()


def _run(layer: LinearBase, precision: str, x: torch.Tensor) -> torch.Tensor:
    with forward_context(ForwardContext(precision, None, None)):
        return layer(x)


def test_registry_creates_every_precision():
    assert isinstance(create_quant_method("bf16"), Unquantized)
    assert isinstance(create_quant_method("nvfp4"), NVFP4Method)
    assert isinstance(create_quant_method("fp8"), FP8Method)
    with pytest.raises(ValueError, match="unknown precision"):
        create_quant_method("int3")


def test_nvfp4_quantize_at_load_shares_one_global_scale():
    w = _weight()
    layer = _merged(("bf16", "nvfp4"))
    _load_shards(layer, w)
    impl = layer.impls["nvfp4"]
    scale = nvfp4_global_scale(tensor_amax(w))  # of the whole merged weight, as Model Optimizer exports
    packed, block_scales = quantize_nvfp4(w, scale)
    assert torch.equal(impl.weight, packed) and torch.equal(_bits(impl.weight_scale), _bits(block_scales))
    assert torch.equal(impl.weight_scale_2, scale.repeat(3)) and impl.x_scale is None
    assert torch.equal(layer.impls["bf16"].weight, w.float())  # BF16 precision holds the weight as is


@pytest.mark.parametrize("cache", ["1", "0"])
def test_nvfp4_apply_is_nvfp4_matmul(monkeypatch, cache):
    monkeypatch.setenv("MIXQUANT_NVFP4_WEIGHT_CACHE", cache)
    w = _weight(1)
    layer = _merged(("nvfp4",))
    _load_shards(layer, w)
    impl = layer.impls["nvfp4"]
    assert (impl.cache is not None) == (cache == "1")
    x = torch.randn(2, 7, K, generator=torch.Generator().manual_seed(2)) * 3
    out = _run(layer, "nvfp4", x)
    scale = impl.weight_scale_2[0]
    ref = nvfp4_matmul(x, impl.weight, impl.weight_scale, scale, out_dtype=torch.float32)  # dynamic scale
    assert out.shape == (2, 7, sum(SIZES)) and torch.equal(out, ref)
    # the dynamic input scale is per token: a row run alone gives the bits it gets inside the batch
    for t in (0, 3, 6):
        assert torch.equal(_run(layer, "nvfp4", x[1, t : t + 1]), out[1, t : t + 1])


def test_nvfp4_checkpoint_scales_per_shard_and_static_input_scale():
    """Shards with their own weight_scale_2 stay exact; the input scale is the largest of the shards'."""
    layer = _merged(("nvfp4",), dtype=torch.bfloat16, bias=True)
    gen = torch.Generator().manual_seed(3)
    parts, in_scales = [], [0.011, 0.013, 0.012]
    for i, n in enumerate(SIZES):
        w = torch.randn(n, K, generator=gen) * (i + 1)
        g = nvfp4_global_scale(tensor_amax(w))
        packed, bs = quantize_nvfp4(w, g)
        for suffix, t in (("weight", packed), ("weight_scale", bs), ("weight_scale_2", g),
                          ("input_scale", torch.tensor(in_scales[i]))):
            layer.load(suffix, t, i)
        parts.append((packed, bs, g))
    bias = torch.randn(sum(SIZES), generator=gen).to(torch.bfloat16)
    layer.load("bias", bias)
    layer.process_after_loading()
    x = torch.randn(5, K, generator=gen).to(torch.bfloat16)
    out = _run(layer, "nvfp4", x)
    x_scale = torch.tensor(max(in_scales))
    ref = torch.cat([nvfp4_matmul(x, p, bs, g, input_global_scale=x_scale, out_dtype=torch.float32)
                     for p, bs, g in parts], dim=-1)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (ref + bias.float()).to(torch.bfloat16))


def test_nvfp4_missing_tensors_are_named():
    layer = _merged(("nvfp4",))
    packed, bs = quantize_nvfp4(torch.randn(SIZES[0], K), torch.tensor(0.01))
    layer.load("weight", packed, 0)
    layer.load("weight_scale", bs, 0)
    method, impl = layer.methods["nvfp4"], layer.impls["nvfp4"]
    missing = method.missing(impl, layer)
    assert "weight_scale_2[0]" in missing and "weight[1]" in missing and "weight[0]" not in missing
    with pytest.raises(ValueError, match="incomplete"):
        layer.process_after_loading()
    with pytest.raises(ValueError, match="NVFP4 expects"):
        layer.load("weight_scale", bs.float(), 1)  # wrong dtype
    with pytest.raises(ValueError, match="one value"):
        layer.load("input_scale", torch.ones(2), 1)


def test_nvfp4_half_loaded_bf16_weight_is_incomplete():
    layer = _merged(("nvfp4",))
    layer.load("weight", _weight()[: SIZES[0]], 0)
    with pytest.raises(ValueError, match="incomplete"):
        layer.process_after_loading()


def test_nvfp4_rejects_k_not_multiple_of_16():
    layer = LinearBase(40, [16], False, ("bf16", "nvfp4"), torch.float32, "cpu")
    assert "multiple of 16" in layer.methods["nvfp4"].unsupported(layer)
    assert layer.methods["bf16"].unsupported(layer) is None


def test_nvfp4_unquantized_layer_runs_dense():
    """A layer a quantized checkpoint left in BF16 (`weight_unquantized`) runs as a plain linear."""
    w = _weight(4, sizes=[48])
    layer = LinearBase(K, [48], False, ("nvfp4",), torch.float32, "cpu")
    layer.load("weight_unquantized", w)
    layer.process_after_loading()
    x = torch.randn(3, K)
    assert torch.equal(_run(layer, "nvfp4", x), torch.nn.functional.linear(x, w.float()))
    assert layer.methods["nvfp4"].weight_bytes(layer.impls["nvfp4"]) >= w.numel() * 4


def test_fp8_method_matches_fp8_linear():
    w = _weight(5)
    layer = _merged(("bf16", "fp8"), dtype=torch.bfloat16)
    _load_shards(layer, w, order=(1, 2, 0))
    impl = layer.impls["fp8"]
    w_fp8, scale = quantize_fp8_per_channel(w)  # per-channel scales: merged == shard by shard
    assert torch.equal(_bits(impl.weight), _bits(w_fp8)) and torch.equal(impl.weight_scale, scale)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    assert torch.equal(_run(layer, "fp8", x), fp8_linear(x, w_fp8, scale, out_dtype=torch.bfloat16))
    # and it is a quantization of the BF16 layer, not something else
    ref = _run(layer, "bf16", x).float()
    assert (_run(layer, "fp8", x).float() - ref).norm() / ref.norm() < 0.06


@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_asks_for_and_takes_an_input_quantized_by_its_producer(with_bias):
    layer = _merged(("bf16", "fp8", "nvfp4"), dtype=torch.bfloat16, bias=with_bias)
    _load_shards(layer, _weight(7))
    if with_bias:
        layer.load("bias", torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(8)).bfloat16())
    wants = {}
    for p in ("bf16", "fp8", "nvfp4"):
        with forward_context(ForwardContext(p, None, None)):
            wants[p] = layer.input_quant()
    # BF16 takes its producer's inputs for a small-batch GEMV where quant/methods.py's small_batch_gemv says so
    assert wants == {"bf16": GEMV_PROLOGUE, "fp8": FP8_PER_TOKEN, "nvfp4": None}
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    quantized = QuantizedActivation(*quantize_fp8_per_token(x), x.dtype)
    out = _run(layer, "fp8", quantized)
    assert out.dtype == torch.bfloat16 and torch.equal(out, _run(layer, "fp8", x))


def test_fp8_missing_shard():
    layer = _merged(("fp8",))
    layer.load("weight", _weight()[: SIZES[0]], 0)
    assert layer.methods["fp8"].missing(layer.impls["fp8"], layer) == ["weight[1]", "weight[2]"]


def test_nvfp4_is_close_to_fake_quantized_reference():
    """Independent of our GEMM: a float64 product of fake-quantized operands."""
    w = _weight(7)
    layer = _merged(("nvfp4",))
    _load_shards(layer, w)
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(8))
    g_w = nvfp4_global_scale(tensor_amax(w))
    g_x = nvfp4_row_global_scale(x)  # dynamic input scale: one per token
    ref = fake_quantize_nvfp4(x.double(), g_x) @ fake_quantize_nvfp4(w.double(), g_w).T
    out = _run(layer, "nvfp4", x).double()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_weight_and_cache_bytes():
    layer = _merged(("bf16", "nvfp4", "fp8"), dtype=torch.bfloat16)
    _load_shards(layer, _weight(9))
    n = sum(SIZES)
    got = layer.weight_bytes()
    assert got["bf16"] == n * K * 2
    assert got["nvfp4"] == n * K // 2 + n * K // 16 + 2 * len(SIZES) * 4  # codes, e4m3 scales, fp32 scalars
    assert got["fp8"] == n * K + n * 4
    nv = layer.methods["nvfp4"]
    assert nv.cache_bytes(layer.impls["nvfp4"]) == n * K * 4  # float32 dequantized weight on CPU
    assert layer.methods["bf16"].cache_bytes(layer.impls["bf16"]) == 0


@pytest.mark.parametrize("cache", ["1", "0"])
@pytest.mark.parametrize("precision", ["bf16", "fp8", "nvfp4"])
def test_apply_rows_is_those_columns_of_apply(monkeypatch, precision, cache):
    """A method restricted to some output rows (the q rows of a qkv projection whose k/v run in BF16) gives
    those columns of its full output."""
    monkeypatch.setenv("MIXQUANT_NVFP4_WEIGHT_CACHE", cache)
    layer = _merged(("bf16", precision), bias=True)
    _load_shards(layer, _weight(3))
    layer.load("bias", torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(4)))
    layer.process_after_loading()
    x = torch.randn(5, layer.input_size, generator=torch.Generator().manual_seed(5)) * 3
    method, impl = layer.methods[precision], layer.impls[precision]
    full = method.apply(impl, x, layer.bias)
    for sl in (slice(0, SIZES[0]), slice(SIZES[0], None)):
        part = method.apply_rows(impl, x, layer.bias[sl], sl)
        torch.testing.assert_close(part, full[:, sl], rtol=1e-6, atol=1e-6)


def test_qkv_k_v_columns_from_the_kv_precision():
    """With a K/V precision in the forward context, a qkv layer's q columns come from the phase's precision
    and its k/v columns from the K/V precision's weights; without one, all from the phase's."""
    from mixquant_serve.layers.linear import QKVLinear

    layer = QKVLinear(64, 16, 2, 1, True, ("bf16", "nvfp4"), torch.float32, "cpu")
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(6)) * 0.1
    for i, (start, n) in enumerate(((0, 32), (32, 16), (48, 16))):
        layer.load("weight", w[start : start + n], i)
    layer.load("bias", torch.randn(64, generator=torch.Generator().manual_seed(7)))
    layer.process_after_loading()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    with forward_context(ForwardContext("nvfp4", None, None)):
        quant = layer(x)
    with forward_context(ForwardContext("bf16", None, None)):
        plain = layer(x)
    with forward_context(ForwardContext("nvfp4", None, None, kv_precision="bf16")):
        assert layer.input_quant() is None  # the k/v columns need the plain input
        mixed = layer(x)
    torch.testing.assert_close(mixed[:, :32], quant[:, :32], rtol=1e-6, atol=1e-6)
    assert torch.equal(mixed[:, 32:], plain[:, 32:])
    assert not torch.allclose(quant[:, 32:], plain[:, 32:], atol=1e-3)  # NVFP4 k/v would have differed
