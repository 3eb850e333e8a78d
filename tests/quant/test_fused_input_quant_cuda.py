"""FP8 and NVFP4 prefill with the activation quantization fused into RMSNorm and SiLU-mul, against the
unfused path (the 16-bit norm / silu-mul output quantized by the linear): the same bits into every GEMM, so
the same outputs, from one layer up to a whole engine's logits. GPU only."""

from __future__ import annotations

import pytest
import torch
from logit_spy import LogitSpy
from random_qwen3 import TEXT, build_random_qwen3

from mixquant_serve import Engine, SamplingParams
from mixquant_serve.kernels import rmsnorm, silu_mul
from mixquant_serve.layers.activation import GatedAct
from mixquant_serve.layers.forward_context import ForwardContext, forward_context
from mixquant_serve.layers.linear import LinearBase
from mixquant_serve.layers.norm import RMSNorm
from mixquant_serve.quant.methods import FP8_PER_TOKEN, NVFP4_FOLDED, QuantizedActivation

pytestmark = pytest.mark.gpu
HIDDEN, INTER = 4096, 12288  # Qwen3-8B
QKV = [4096, 1024, 1024]
# precision -> what its linears ask of their producers, and the fused kernels that make it
FUSED = {"fp8": (FP8_PER_TOKEN, "rmsnorm_fp8", "silu_mul_fp8"),
         "nvfp4": (NVFP4_FOLDED, "rmsnorm_nvfp4", "silu_mul_nvfp4")}


def _randn(*shape: int, seed: int, spread: float = 0.0) -> torch.Tensor:
    """Gaussian bfloat16 rows on the GPU, each scaled by exp(spread * N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * torch.exp(spread * torch.randn(*shape[:-1], 1, generator=gen))
    return x.to(torch.bfloat16).cuda()


def _linear(k: int, sizes: list[int], seed: int, precision: str) -> LinearBase:
    layer = LinearBase(k, sizes, False, ("bf16", precision), torch.bfloat16, "cuda")
    for i, n in enumerate(sizes):
        layer.load("weight", _randn(n, k, seed=seed + i) * 0.02, i)
    layer.process_after_loading()
    return layer


def _norm(seed: int) -> RMSNorm:
    norm = RMSNorm(HIDDEN, 1e-6, torch.bfloat16).cuda()
    norm.weight.data = 1 + 0.2 * _randn(HIDDEN, seed=seed)
    return norm


@pytest.mark.parametrize("precision", sorted(FUSED))
@pytest.mark.parametrize("t", [1, 333])
def test_fused_norm_feeds_qkv_the_same_bits(t, precision):
    norm, qkv = _norm(1), _linear(HIDDEN, QKV, 2, precision)
    x, r = _randn(t, HIDDEN, seed=3, spread=1.0), _randn(t, HIDDEN, seed=4)
    with forward_context(ForwardContext(precision, None, None)):
        spec = qkv.input_quant()
        assert spec == FUSED[precision][0]
        h = norm(x, spec)
        assert isinstance(h, QuantizedActivation) and h.dtype == torch.bfloat16
        assert torch.equal(qkv(h), qkv(norm(x)))
        h, res = norm.add_norm(x, r, spec)
        want, want_res = norm.add_norm(x, r)
        assert isinstance(h, QuantizedActivation) and torch.equal(res, want_res)
        assert torch.equal(qkv(h), qkv(want))
    with forward_context(ForwardContext("bf16", None, None)):
        assert qkv.input_quant() is None
        assert torch.equal(norm(x, qkv.input_quant()), norm(x))


@pytest.mark.parametrize("precision", sorted(FUSED))
@pytest.mark.parametrize("t", [1, 333])
def test_fused_silu_mul_feeds_down_proj_the_same_bits(t, precision):
    act, down = GatedAct("silu"), _linear(INTER, [HIDDEN], 5, precision)
    gate_up = _randn(t, 2 * INTER, seed=6, spread=1.0) * 2
    with forward_context(ForwardContext(precision, None, None)):
        h = act(gate_up, down.input_quant())
        assert isinstance(h, QuantizedActivation) and h.data.shape == (t, INTER)
        assert torch.equal(down(h), down(act(gate_up)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_random_qwen3(tmp_path_factory.mktemp("qwen3-fp8-fused"))


def _generate(model_dir: str, precision: str) -> tuple[list, LogitSpy]:
    engine = Engine(model_dir, device="cuda", dtype="bfloat16", prefill_precision=precision, decode_precision="bf16",
                    attention_backend="triton", context_length=1024, max_total_tokens=16384, page_size=16,
                    cuda_graph_max_bs=16, overlap_schedule=False)
    spy = LogitSpy(engine)
    prompts = [engine.tokenizer.encode(" ".join(TEXT[i * 5 : i * 5 + 3 + 4 * i])) for i in range(6)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    return outs, spy


def _counting(monkeypatch, module, name: str, calls: dict[str, int]) -> None:
    inner = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("precision", sorted(FUSED))
def test_engine_logits_fused_equal_unfused(model_dir, monkeypatch, precision):
    """Quantized prefill then BF16 decode: every logits row the same bits with and without the fused
    quantization."""
    calls: dict[str, int] = {}
    _, norm_kernel, act_kernel = FUSED[precision]
    _counting(monkeypatch, rmsnorm, norm_kernel, calls)
    _counting(monkeypatch, silu_mul, act_kernel, calls)
    fused, spy_f = _generate(model_dir, precision)
    assert calls.get(norm_kernel, 0) > 0 and calls.get(act_kernel, 0) > 0, "the fused kernels ran"
    calls.clear()
    monkeypatch.setattr(LinearBase, "input_quant", lambda self: None)  # every linear quantizes its own input
    plain, spy_p = _generate(model_dir, precision)
    assert not calls
    assert [o.token_ids for o in fused] == [o.token_ids for o in plain]
    for a, b in zip(fused, plain, strict=True):
        rows_f, rows_p = spy_f.rows[a.rid], spy_p.rows[b.rid]
        assert len(rows_f) == len(rows_p) and all(torch.equal(x, y) for x, y in zip(rows_f, rows_p, strict=True))
