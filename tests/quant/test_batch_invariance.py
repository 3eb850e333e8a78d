"""Batch-invariant NVFP4 prefill: with quantize-at-load weights (no calibrated input scale) the dynamic
activation scale is per token, so a prompt's KV does not depend on the prompts batched with it."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve import Engine, SamplingParams


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A whole model on a shared 2-core machine: one OpenMP thread (spinning threads slow everything)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _prefill(engine: Engine, prompts: dict[str, list[int]]) -> dict[str, list[torch.Tensor]]:
    """Prefill the prompts in one batch; each one's K and V of every layer, [tokens, kv_heads, head_dim]."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, SamplingParams(max_tokens=1), prefill_only=True)
    done: dict[str, list[torch.Tensor]] = {}
    batches: list[set[str]] = []
    forward = engine.runner.forward
    engine.runner.forward = lambda batch, *a, **kw: batches.append({r.rid for r in batch.reqs}) or forward(
        batch, *a, **kw)
    while len(done) < len(prompts):
        engine.step()
        for req in engine.take_prefilled():
            storage, ps = engine.runner.storage, engine.config.page_size
            slots = torch.tensor([req.pages[p // ps] * ps + p % ps for p in range(len(req.prompt_ids))])
            done[req.rid] = [storage.flat(i)[kv][slots].clone() for i in range(len(storage.k)) for kv in (0, 1)]
            engine.release_prefilled(req.rid)
    engine.runner.forward = forward
    assert batches == [set(prompts)]  # one forward, all prompts in it
    return done


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_nvfp4_prefill_kv_does_not_depend_on_the_batch(smollm_path, device):
    # float32 (on CPU bfloat16 takes 1.5x as long and tests the same thing); with the old per-batch
    # dynamic scale this fails at the first layer's K. On CUDA: the Triton kernels' path.
    engine = Engine(smollm_path, dtype="float32", device=device, prefill_precision="nvfp4",
                    decode_precision="bf16", enable_prefix_caching=False, max_total_tokens=512, context_length=256)
    tok = engine.tokenizer
    prompt = tok.encode("The capital of France is Paris, and the capital of Italy is")
    # neighbours with much larger and much smaller activations would move a per-batch scale
    others = {"a": tok.encode("1234567890 " * 6), "b": tok.encode("Once upon a time, in a land far away,")}
    alone = _prefill(engine, {"p": prompt})["p"]
    batched = _prefill(engine, {"a": others["a"], "p": prompt, "b": others["b"]})["p"]
    assert len(alone) == 2 * engine.model_config.num_layers
    for layer, (x, y) in enumerate(zip(alone, batched, strict=True)):
        assert torch.equal(x, y), f"KV tensor {layer} differs"
