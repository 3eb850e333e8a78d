"""The engine and the disaggregated workers on CUDA (skipped without a GPU; the pair test needs two).

Self-contained for offline GPU hosts: a small random Qwen3 checkpoint and a byte-level BPE tokenizer are
built in the test, so nothing has to be downloaded or carried.
"""

from __future__ import annotations

import pytest
import torch
from cluster import WorkerProc
from random_qwen3 import TEXT, build_random_qwen3

from mixquant_serve import Engine, SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_random_qwen3(tmp_path_factory.mktemp("qwen3-random"))


def prompts(engine: Engine) -> list[list[int]]:
    return [engine.tokenizer.encode(" ".join(TEXT[i : i + n])) for i, n in ((0, 3), (10, 12), (50, 30))]


def test_engine_on_cuda_matches_transformers(model_dir):
    from transformers import AutoModelForCausalLM

    engine = Engine(model_dir, device="cuda", dtype="float32", prefill_precision="bf16", decode_precision="bf16",
                    context_length=1024, max_total_tokens=8192)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    hf.generation_config.eos_token_id = None
    for ids, out in zip(prompts(engine), engine.generate(prompts(engine), GREEDY), strict=True):
        ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert out.token_ids == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("prefill", ["nvfp4", "fp8"])
def test_quantized_prefill_on_cuda_serves(model_dir, prefill):
    engine = Engine(model_dir, device="cuda", prefill_precision=prefill, decode_precision="bf16",
                    context_length=1024, max_total_tokens=8192)
    outs = engine.generate(prompts(engine), GREEDY)
    assert all(len(o.token_ids) == 16 and o.error is None for o in outs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_disaggregated_over_nccl_equals_colocated(model_dir):
    args = ["--model-path", model_dir, "--device", "cuda", "--dtype", "float32", "--context-length", "1024",
            "--max-total-tokens", "8192", "--prefill-precision", "bf16", "--decode-precision", "bf16",
            "--transfer-backend", "nccl", "--chunked-prefill-size", "64"]
    p = WorkerProc("prefill_worker", *args, name="gpu-p", env={"CUDA_VISIBLE_DEVICES": "0"}).wait_ready()
    d = WorkerProc("decode_worker", *args, name="gpu-d", env={"CUDA_VISIBLE_DEVICES": "1"}).wait_ready()
    try:
        colocated = Engine(model_dir, device="cuda", dtype="float32", prefill_precision="bf16",
                           decode_precision="bf16", context_length=1024, max_total_tokens=8192)
        cases = prompts(colocated)
        for i, ids in enumerate(cases):
            d.submit(f"g{i}", ids, GREEDY, prefill_url=p.url)
        for i, ref in enumerate(colocated.generate(cases, GREEDY)):
            tokens, final = d.result(f"g{i}", timeout=120)
            assert final.error is None and tokens == ref.token_ids
        stats = d.fresh_stats()
        assert stats.counters["kv_transfers_ok"] >= 3 and stats.counters["kv_bytes_received"] > 0
    finally:
        p.stop(), d.stop()
