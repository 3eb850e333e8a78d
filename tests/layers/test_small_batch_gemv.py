"""kernels/gemv.py inside the model (quant/methods.py's small_batch_gemv): the RMSNorm before qkv/gate_up and the
SiLU-mul before down are left to the GEMV's prologue for batches of up to "gemv" max_rows rows. On CPU the kernels
run in Triton's interpreter (graph_only 0); the engine's decode must match the cuBLAS/eager path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mixquant_serve import Engine, SamplingParams
from mixquant_serve.quant import methods
from mixquant_serve.quant.methods import DeferredRMSNorm, DeferredSiluMul, graph_warmup, small_batch_gemv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from random_qwen3 import TEXT, build_random_qwen3  # noqa: E402

ON = json.dumps({"gemv": {"max_rows": 4, "graph_only": 0}})


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> str:
    return build_random_qwen3(tmp_path_factory.mktemp("qwen3-gemv"))


def test_when_the_gemv_applies(monkeypatch):
    x = torch.randn(3, 64)
    monkeypatch.delenv("MIXQUANT_KERNEL_CONFIGS", raising=False)
    assert not small_batch_gemv(x)  # off by default
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", ON)
    assert small_batch_gemv(x) == (methods.os.environ.get("TRITON_INTERPRET") == "1")  # a CPU tensor
    assert not small_batch_gemv(torch.randn(5, 64)) and not small_batch_gemv(torch.randn(0, 64))
    assert not small_batch_gemv(torch.randn(2, 64).long()) and not small_batch_gemv(torch.randn(1, 2, 64))
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"gemv": {"max_rows": 4}}))  # graph_only 1
    assert not small_batch_gemv(x)
    with graph_warmup():
        assert small_batch_gemv(x) == (x.is_cuda or methods.os.environ.get("TRITON_INTERPRET") == "1")
    assert not small_batch_gemv(x)


def test_producers_defer_to_the_gemv(monkeypatch, qwen3):
    from mixquant_serve.layers.forward_context import ForwardContext, forward_context

    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", ON)
    engine = Engine(qwen3, dtype="float32", max_total_tokens=2048, context_length=512)
    layer = engine.runner.model.model.layers[0]
    x, res = torch.randn(2, 256), torch.randn(2, 256)
    with forward_context(ForwardContext("bf16", None, None)):
        quant = layer.mlp.gate_up_proj.input_quant()
        normed, total = layer.post_attention_layernorm.add_norm(x, res, quant)
        assert isinstance(normed, DeferredRMSNorm) and normed.residual_out is total
        assert isinstance(layer.mlp.act(torch.randn(2, 1024), layer.mlp.down_proj.input_quant()), DeferredSiluMul)
        want = layer.post_attention_layernorm.add_norm(x, res)[0]
        got = layer.mlp.gate_up_proj(normed)
        plain = torch.nn.functional.linear(want, layer.mlp.gate_up_proj.impls["bf16"].weight)
        big = layer.post_attention_layernorm.add_norm(torch.randn(9, 256), torch.randn(9, 256), quant)[0]
    torch.testing.assert_close(total, x + res)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
    assert isinstance(big, torch.Tensor)  # 9 rows: the norm runs, cuBLAS follows


def test_decode_matches_the_unfused_path(monkeypatch, qwen3):
    """Two requests decode together (2-row batches through the GEMVs); tokens equal, logprobs to rounding."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [TEXT[3], TEXT[11] + " " + TEXT[12]]

    def run() -> list:
        engine = Engine(qwen3, dtype="float32", max_total_tokens=2048, context_length=512)
        return engine.generate(prompts, params)

    monkeypatch.delenv("MIXQUANT_KERNEL_CONFIGS", raising=False)
    want = run()
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", ON)
    calls = []
    gemv_mod = __import__("mixquant_serve.kernels.gemv", fromlist=["x"])
    for name in ("gemv", "rmsnorm_gemv", "silu_mul_gemv"):
        real = getattr(gemv_mod, name)
        monkeypatch.setattr(gemv_mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    got = run()
    assert {"gemv", "rmsnorm_gemv", "silu_mul_gemv"} <= set(calls)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert [lp.logprob for lp in g.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)
