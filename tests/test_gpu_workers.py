"""The engine and the disaggregated workers on CUDA (skipped without a GPU; the pair test needs two).

Self-contained for offline GPU hosts: a small random Qwen3 checkpoint and a byte-level BPE tokenizer are
built in the test, so nothing has to be downloaded or carried.
"""

from __future__ import annotations

import json

import pytest
import torch
from cluster import WorkerProc

from mixquant_serve import Engine, SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
TEXT = [f"agent step {i}: read file {i % 7}, found {i * 3} errors, retrying the tool call" for i in range(400)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, Qwen3Config

    folder = tmp_path_factory.mktemp("qwen3-random")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=2048)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return str(folder)


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
