"""The engine against Hugging Face transformers on the same checkpoint: logits at prefill and at every
decode step, and greedy generation token for token.

float32 proves exactness of the math (same ops, tight tolerance); bf16 is checked with a tolerance and
accepts a greedy flip only where HF's top two logits nearly tie.
"""

from __future__ import annotations

import pytest
import torch
from logit_spy import LogitSpy
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from mixquant_serve import Engine, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    '''Return the n-th Fibonacci number.'''\n",
    "In a distant galaxy, a small robot named Pixel discovered that the stars were",
]
STEPS = 32


def hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    model.generation_config.eos_token_id = None  # run all steps, like ignore_eos (no EOS suppression)
    out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), [lg[0].float() for lg in out.logits]


def run_engine(engine: Engine, prompts_ids: list[list[int]]):
    spy = LogitSpy(engine)
    params = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts_ids, params)
    return [(o.token_ids, spy.rows[o.rid]) for o in outs]


def compare(engine: Engine, hf_model, tok_ids: list[list[int]], atol: float, exact: bool) -> None:
    for ids, (tokens, rows) in zip(tok_ids, run_engine(engine, tok_ids), strict=True):
        hf_tokens, hf_rows = hf_greedy(hf_model, ids, STEPS)
        n = len(hf_tokens)
        for step in range(n):
            if tokens[step] != hf_tokens[step]:
                assert not exact, f"greedy differs at step {step}: {tokens[step]} vs {hf_tokens[step]}"
                top2 = hf_rows[step].topk(2).values
                assert (top2[0] - top2[1]).item() < 0.25, f"flip at step {step} is not a near tie"
                break  # the sequences diverge from here on
            diff = (rows[step].cpu() - hf_rows[step]).abs().max().item()
            assert diff <= atol, f"step {step}: max |logit diff| {diff:.4g} > {atol}"
        else:
            assert tokens == hf_tokens


@pytest.fixture(scope="module")
def smollm_f32(smollm_path):
    return AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32).eval()


def test_smollm_float32_exact(smollm_path, smollm_f32):
    engine = Engine(smollm_path, dtype="float32", prefill_precision="bf16", max_total_tokens=4096,
                    context_length=2048)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    compare(engine, smollm_f32, ids, atol=2e-3, exact=True)
    assert engine.pool.num_free + (engine.cache.num_pages if engine.cache else 0) == engine.pool.capacity


def teacher_forced(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """HF logits predicting each of `tokens` after prompt (one forward over the whole sequence)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    return logits[len(prompt) - 1 : -1]


def test_smollm_bf16_within_tolerance(smollm_path, smollm_f32):
    """In bf16 the engine is as close to the float32 truth as HF's own bf16 is; greedy flips only at ties."""
    hf16 = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.bfloat16).eval()
    engine = Engine(smollm_path, prefill_precision="bf16", max_total_tokens=4096, context_length=2048)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    for prompt, (tokens, rows) in zip(ids, run_engine(engine, ids), strict=True):
        ours = torch.stack(rows).cpu()
        truth = teacher_forced(smollm_f32, prompt, tokens)
        theirs = teacher_forced(hf16, prompt, tokens)
        ours_err, hf_err = (ours - truth).abs(), (theirs - truth).abs()
        assert ours_err.mean() <= 1.5 * hf_err.mean() + 0.01, (ours_err.mean(), hf_err.mean())
        assert ours_err.max() <= 1.5 * hf_err.max() + 0.1, (ours_err.max(), hf_err.max())
        hf_tokens, hf_rows = hf_greedy(hf16, prompt, STEPS)
        diverged = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens, strict=False)) if a != b), None)
        if diverged is not None:  # both picks must be within bf16 noise of each other in the float32 truth
            a, b = tokens[diverged], hf_tokens[diverged]
            margin = (truth[diverged, a] - truth[diverged, b]).abs().item()
            noise = hf_err[diverged].max().item()
            assert margin < noise, (f"greedy flip at step {diverged}: f32 margin {margin:.3f} >= "
                                    f"noise {noise:.3f}")


def _random_checkpoint(tmp_path, config) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the default init make the test sensitive to mistakes
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path)
    return str(tmp_path)


SMALL = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_random_qwen_float32_exact(arch, tmp_path, smollm_path):
    cfg = (Qwen3Config(head_dim=48, rope_theta=1e6, **SMALL) if arch == "qwen3"
           else Qwen2Config(rope_theta=1e6, **SMALL))
    path = _random_checkpoint(tmp_path, cfg)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(path, tokenizer_path=smollm_path, dtype="float32", prefill_precision="bf16",
                    max_total_tokens=4096, context_length=2048)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    compare(engine, hf, ids, atol=1e-3, exact=True)
