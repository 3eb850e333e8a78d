"""The CUDA fast path (Triton attention, fused norm/rotary/activation kernels, decode CUDA graphs) against the
eager reference path (PyTorch attention, no graphs) on the same GPU. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from logit_spy import LogitSpy
from random_qwen3 import TEXT, build_random_qwen3

from mixquant_serve import Engine, SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_random_qwen3(tmp_path_factory.mktemp("qwen3-fast-path"))


def _engine(model_dir: str, dtype: str, fast: bool, **kw) -> Engine:
    """fast: Triton attention and decode graphs; the overlap stays off unless asked for (the logit spies see
    only synchronous sampling)."""
    path = dict(attention_backend="triton", disable_cuda_graph=False) if fast else dict(
        attention_backend="torch_ref", disable_cuda_graph=True)
    kw.setdefault("overlap_schedule", False)
    kw.setdefault("prefill_precision", "bf16")
    return Engine(model_dir, device="cuda", dtype=dtype, decode_precision="bf16",
                  context_length=1024, max_total_tokens=16384, page_size=16, cuda_graph_max_bs=16, **path, **kw)


def _prompts(engine: Engine, n: int) -> list[list[int]]:
    return [engine.tokenizer.encode(" ".join(TEXT[i * 7 : i * 7 + 2 + 5 * (i % 6)])) for i in range(n)]


@pytest.mark.parametrize("batch", [1, 3, 16, 21])  # a captured size, a padded one, the largest, beyond it
def test_fast_path_equals_reference_in_float32(model_dir, batch):
    fast, ref = _engine(model_dir, "float32", True), _engine(model_dir, "float32", False)
    assert fast.runner.graphs is not None and ref.runner.graphs is None
    spy_f, spy_r = LogitSpy(fast), LogitSpy(ref)
    prompts = _prompts(fast, batch)
    outs_f, outs_r = fast.generate(prompts, GREEDY), ref.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs_f] == [o.token_ids for o in outs_r]
    for a, b in zip(outs_f, outs_r, strict=True):
        for x, y in zip(spy_f.rows[a.rid], spy_r.rows[b.rid], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_fast_path_in_bfloat16_stays_close(model_dir):
    fast, ref = _engine(model_dir, "bfloat16", True), _engine(model_dir, "bfloat16", False)
    spy_f, spy_r = LogitSpy(fast), LogitSpy(ref)
    prompts = _prompts(fast, 6)
    outs_f, outs_r = fast.generate(prompts, GREEDY), ref.generate(prompts, GREEDY)
    for a, b in zip(outs_f, outs_r, strict=True):
        for step, (x, y) in enumerate(zip(spy_f.rows[a.rid], spy_r.rows[b.rid], strict=True)):
            if a.token_ids[:step] != b.token_ids[:step]:
                break  # the contexts differ from here on
            assert (x - y).abs().max() < 0.1
            if a.token_ids[step] != b.token_ids[step]:  # only a near-tie may flip
                top2 = y.topk(2).values
                assert top2[0] - top2[1] < 0.1


def test_graphs_survive_prefix_hits_and_mixed_lengths(model_dir):
    """Second turns hit the prefix cache; decode batches of changing sizes replay padded graphs."""
    fast, ref = _engine(model_dir, "float32", True), _engine(model_dir, "float32", False)
    first = _prompts(fast, 5)
    for engine in (fast, ref):
        engine.generate(first, GREEDY)
    second = [p + p[:9] for p in first]
    params = [SamplingParams(max_tokens=3 + 4 * i, temperature=0, ignore_eos=True) for i in range(5)]
    got, want = fast.generate(second, params), ref.generate(second, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(o.cached_tokens > 0 for o in got)
    assert fast.pool.num_free + (fast.cache.num_pages if fast.cache else 0) == fast.pool.capacity


def test_overlapped_decode_on_cuda_equals_the_synchronous_step(model_dir):
    """The default CUDA engine (graphs + overlap) against the same engine stepping synchronously."""
    on, off = _engine(model_dir, "float32", True, overlap_schedule=True), _engine(model_dir, "float32", True)
    prompts = _prompts(on, 9)
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0.7 * (i % 2), seed=i, ignore_eos=True)
              for i in range(9)]
    got, want = on.generate(prompts, params), off.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert not on.has_work and on.pool.num_free + on.cache.num_pages == on.pool.capacity


@pytest.mark.parametrize("prefill", ["bf16", "fp8", "nvfp4"])
def test_piecewise_prompt_graphs_equal_the_eager_prompt_forward(model_dir, prefill):
    """Prompt batches through the captured pieces (padded token counts, slot-0 padding writes, prefix hits,
    Mix-Quant's tails and the NVFP4 K/V lever) against the same engine with them off, in bfloat16."""
    kw = dict(prefill_precision=prefill, bf16_tail_tokens=4, piecewise_cuda_graph_max_tokens=256)
    on = _engine(model_dir, "bfloat16", True, **kw)
    off = _engine(model_dir, "bfloat16", True, **{**kw, "piecewise_cuda_graph_max_tokens": 0})
    assert on.runner.piecewise is not None and off.runner.piecewise is None
    assert on.runner.piecewise.keys[0] == (prefill, "bf16" if prefill == "nvfp4" else None)
    spy_on, spy_off = LogitSpy(on), LogitSpy(off)
    first = _prompts(on, 7)
    for prompts in (first, [p + p[:9] for p in first]):  # the second turn hits the prefix cache
        outs_on, outs_off = on.generate(prompts, GREEDY), off.generate(prompts, GREEDY)
        for a, b in zip(outs_on, outs_off, strict=True):
            for step, (x, y) in enumerate(zip(spy_on.rows[a.rid], spy_off.rows[b.rid], strict=True)):
                if a.token_ids[:step] != b.token_ids[:step]:
                    break
                assert (x - y).abs().max() < 0.1
                if a.token_ids[step] != b.token_ids[step]:
                    top2 = y.topk(2).values
                    assert top2[0] - top2[1] < 0.1
    assert on.pool.num_free + on.cache.num_pages == on.pool.capacity


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_small_batch_gemv_in_the_decode_graphs(model_dir, monkeypatch, dtype):
    """kernels/gemv.py with the norms and SiLU-mul fused, captured in the decode graphs of batches up to 4 rows
    ("gemv" max_rows), against the same graphs on cuBLAS: float32 to rounding, bfloat16 within near-ties."""
    prompts = None
    outs, spies = [], []
    for on in (False, True):
        monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", '{"gemv": {"max_rows": 4}}' if on else "{}")
        engine = _engine(model_dir, dtype, True)
        prompts = prompts or _prompts(engine, 3)
        spies.append(LogitSpy(engine))
        outs.append(engine.generate(prompts, GREEDY))
    for a, b in zip(*outs, strict=True):
        for step, (x, y) in enumerate(zip(spies[1].rows[a.rid], spies[0].rows[b.rid], strict=True)):
            if dtype == "float32":
                assert a.token_ids == b.token_ids
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
                continue
            if a.token_ids[:step] != b.token_ids[:step]:
                break
            assert (x - y).abs().max() < 0.1
