"""Mix-Quant in one process: NVFP4 prefill, BF16 decode, one KV pool, shared tensors held once.

The engine is checked against an independent reference built from Hugging Face transformers: the
checkpoint's NVFP4 weights dequantized into nn.Linear and every linear input fake-quantized by Model
Optimizer's own NVFP4QTensor in a forward pre-hook. The reference prefills prompt[:-1] in NVFP4; the
plain model then continues from that cache. The acceptance test runs the accuracy harness: Mix-Quant's
decode-step KL against BF16 is clearly lower than NVFP4 end to end, on SmolLM2 and on a random Qwen3.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from mixquant_serve import Engine, SamplingParams
from mixquant_serve.data import read_jsonl
from mixquant_serve.layers.linear import LinearBase
from mixquant_serve.quant.nvfp4 import dequantize_nvfp4
from mixquant_serve.tokenizer import Tokenizer

qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor").NVFP4QTensor

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
             tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
STEPS = 6


def _harness():
    spec = importlib.util.spec_from_file_location("accuracy_harness", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


accuracy = _harness()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run whole models: on a machine shared with other jobs, OpenMP threads spin-waiting on
    busy cores make every small op many times slower, so use one thread here and restore afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smollm_path):
    """A random BF16 Llama and its NVFP4 checkpoint, calibrated by `mixquant-serve quantize`."""
    from mixquant_serve.quant.quantize_cli import quantize_checkpoint

    root = tmp_path_factory.mktemp("mixquant")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if "embed" in name else 0.05)
    model.save_pretrained(root / "bf16")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(smollm_path) / f, root / "bf16" / f)
    quantize_checkpoint(str(root / "bf16"), str(root / "nvfp4"), calib_samples=6, calib_seq_len=64,
                        progress=False)
    return str(root / "bf16"), str(root / "nvfp4")


def _engine(bf16: str, nvfp4: str | None, prefill: str, decode: str, **kw) -> Engine:
    kw.setdefault("bf16_kv_proj", False)  # the paper's split; the K/V lever has its own tests
    return Engine(bf16, dtype=kw.pop("dtype", "float32"), prefill_precision=prefill,
                  decode_precision=decode, quantized_model_path=nvfp4, max_total_tokens=1024,
                  context_length=512, **kw)


class LogitSpy:
    def __init__(self, engine: Engine) -> None:
        self.inner, self.rows = engine.sampler, []
        engine.sampler = self

    def __call__(self, logits, reqs):
        self.rows.append(logits[0].detach().float().clone())
        return self.inner(logits, reqs)


def _engine_greedy(engine: Engine, prompt: list[int], steps: int = STEPS):
    spy = LogitSpy(engine)
    out = engine.generate([prompt], SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))[0]
    return out.token_ids, spy.rows


def _modelopt_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q, block_scales, _ = qtensor.quantize(x.clone(), 16, weights_scaling_factor_2=scale)
    return q.dequantize(dtype=x.dtype, scale=block_scales, double_scale=scale, block_sizes={-1: 16})


def hf_nvfp4(bf16: str, nvfp4: str, keep: tuple[str, ...] = ()) -> torch.nn.Module:
    """transformers' model with the checkpoint's NVFP4 weights and NVFP4 fake-quantized linear inputs;
    linears whose name ends with one of `keep` stay as the BF16 checkpoint has them."""
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    tensors = load_file(str(Path(nvfp4) / "model.safetensors"))
    for name, mod in model.named_modules():
        if name.endswith(keep) and keep:
            continue
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight_scale" in tensors:
            t = {s: tensors[f"{name}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2")}
            mod.weight.data = dequantize_nvfp4(*t.values(), dtype=torch.float32)
            scale = tensors[f"{name}.input_scale"]
            mod.register_forward_pre_hook(lambda m, args, s=scale: (_modelopt_fake_quant(args[0], s),))
    return model


@pytest.fixture(scope="module")
def references(checkpoints):
    bf16, nvfp4 = checkpoints
    plain = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    return plain, hf_nvfp4(bf16, nvfp4)


PROMPT = [int(t) for t in torch.randint(100, 40000, (37,), generator=torch.Generator().manual_seed(5))]


@torch.no_grad()
def _continue(model, cache, last: int, steps: int):
    """Greedy from `cache` (which holds the prompt but its last token), one token at a time."""
    rows, token = [], last
    for _ in range(steps):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        rows.append(out.logits[0, -1].float())
        token = int(rows[-1].argmax())
    return rows


def _close(ours: list[torch.Tensor], theirs: list[torch.Tensor], atol: float) -> None:
    for step, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        diff = (a - b).abs().max().item()
        assert diff <= atol, f"step {step}: max |logit diff| {diff:.3g} > {atol}"
        if a.argmax() != b.argmax():  # a greedy flip may only come from a near tie; then the paths part
            top2 = b.topk(2).values
            assert (top2[0] - top2[1]).item() < 2 * atol
            break


def test_mixquant_first_token_matches_hf_reference(checkpoints, references):
    """The first token's logits: NVFP4 KV of prompt[:-1], then the BF16 (here float32) model."""
    bf16, nvfp4 = checkpoints
    plain, quant = references
    with torch.no_grad():
        cache = quant(torch.tensor([PROMPT[:-1]]), use_cache=True).past_key_values
    expected = _continue(plain, cache, PROMPT[-1], STEPS)
    _, rows = _engine_greedy(_engine(bf16, nvfp4, "nvfp4", "bf16", bf16_tail_tokens=1), PROMPT)
    _close(rows, expected, atol=1e-4)
    # the test can tell: the pure model and NVFP4 prefill give clearly different first tokens' logits
    with torch.no_grad():
        pure = plain(torch.tensor([PROMPT])).logits[0, -1]
    assert (pure - expected[0]).abs().max().item() > 1000 * 1e-4


@pytest.mark.parametrize("tail", [5, 20])
def test_mixquant_bf16_tail_matches_hf_reference(checkpoints, references, tail):
    """--bf16-tail-tokens K: NVFP4 KV of prompt[:-K], then the BF16 (here float32) model runs the last K
    prompt tokens and samples from its own logits."""
    bf16, nvfp4 = checkpoints
    plain, quant = references
    with torch.no_grad():
        cache = quant(torch.tensor([PROMPT[:-tail]]), use_cache=True).past_key_values
        out = plain(torch.tensor([PROMPT[-tail:]]), past_key_values=cache, use_cache=True)
    first = out.logits[0, -1].float()
    expected = [first, *_continue(plain, out.past_key_values, int(first.argmax()), STEPS - 1)]
    _, rows = _engine_greedy(_engine(bf16, nvfp4, "nvfp4", "bf16", bf16_tail_tokens=tail), PROMPT)
    _close(rows, expected, atol=1e-4)
    _, one = _engine_greedy(_engine(bf16, nvfp4, "nvfp4", "bf16", bf16_tail_tokens=1), PROMPT)
    assert (one[0] - rows[0]).abs().max().item() > 1000 * 1e-4  # the tail changes the first logits


@pytest.mark.parametrize("tail", [1, 16])
def test_bf16_kv_projections_match_hf_reference(checkpoints, references, tail):
    """--bf16-kv-proj: prefill in NVFP4 except the k_proj/v_proj linears, which keep their BF16 weights and
    inputs (the reference), then the BF16 model runs the tail and decodes."""
    bf16, nvfp4 = checkpoints
    plain, quant = references
    kv_reference = hf_nvfp4(bf16, nvfp4, keep=("k_proj", "v_proj"))
    with torch.no_grad():
        cache = kv_reference(torch.tensor([PROMPT[:-tail]]), use_cache=True).past_key_values
        out = plain(torch.tensor([PROMPT[-tail:]]), past_key_values=cache, use_cache=True)
    first = out.logits[0, -1].float()
    expected = [first, *_continue(plain, out.past_key_values, int(first.argmax()), STEPS - 1)]
    _, rows = _engine_greedy(_engine(bf16, nvfp4, "nvfp4", "bf16", bf16_tail_tokens=tail, bf16_kv_proj=True),
                             PROMPT)
    _close(rows, expected, atol=1e-4)
    # the lever changes the logits: NVFP4 K/V projections give clearly different ones
    _, off = _engine_greedy(_engine(bf16, nvfp4, "nvfp4", "bf16", bf16_tail_tokens=tail), PROMPT)
    assert (off[0] - rows[0]).abs().max().item() > 1000 * 1e-4


def test_bf16_tail_as_long_as_the_prompt_is_bf16_end_to_end(checkpoints):
    bf16, nvfp4 = checkpoints
    params = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, logprobs=0)
    whole = _engine(bf16, nvfp4, "nvfp4", "bf16", bf16_tail_tokens=len(PROMPT)).generate([PROMPT], params)[0]
    plain = _engine(bf16, None, "bf16", "bf16").generate([PROMPT], params)[0]
    assert whole.token_ids == plain.token_ids
    assert [lp.logprob for lp in whole.logprobs] == [lp.logprob for lp in plain.logprobs]


@pytest.mark.parametrize("tail", [1, 8])
def test_prompt_tokens_by_precision(checkpoints, monkeypatch, tail):
    """Prefill computes all but the last `tail` prompt tokens in NVFP4; the BF16 side computes the tail and
    every sampled distribution. tail=1 is the split before the tail existed: the last prompt token is the
    first decode step."""
    bf16, _ = checkpoints
    engine = _engine(bf16, None, "nvfp4", "bf16", bf16_tail_tokens=tail, chunked_prefill_size=16)
    batches = []
    forward = engine.runner.forward

    def spy(batch, precision, *args, **kwargs):
        logits = forward(batch, precision, *args, **kwargs)
        batches.append((batch.phase.value, precision, batch.num_tokens, logits is not None))
        return logits

    monkeypatch.setattr(engine.runner, "forward", spy)
    tokens, _ = _engine_greedy(engine, PROMPT, 3)
    assert len(tokens) == 3
    assert sum(n for _, p, n, _ in batches if p == "nvfp4") == len(PROMPT) - tail
    assert all(p == "bf16" for _, p, _, sampled in batches if sampled)
    prompt_in_bf16 = [(ph, n) for ph, p, n, _ in batches if p == "bf16"][: 1 if tail == 1 else 2]
    assert prompt_in_bf16 == ([("decode", 1)] if tail == 1 else [("tail", 8), ("decode", 1)])
    assert engine.scheduler.num_tail_tokens == (0 if tail == 1 else tail)


def test_nvfp4_end_to_end_matches_hf_reference(checkpoints, references):
    bf16, nvfp4 = checkpoints
    _, quant = references
    with torch.no_grad():
        out = quant(torch.tensor([PROMPT]), use_cache=True)
    first = out.logits[0, -1].float()
    expected = [first, *_continue(quant, out.past_key_values, int(first.argmax()), STEPS - 1)]
    _, rows = _engine_greedy(_engine(bf16, nvfp4, "nvfp4", "nvfp4"), PROMPT)
    _close(rows, expected, atol=1e-4)


def test_one_kv_pool_and_shared_tensors_held_once(checkpoints):
    bf16, _ = checkpoints
    engine = _engine(bf16, None, "nvfp4", "bf16", dtype="bfloat16")
    model = engine.runner.model
    per = engine.runner.weight_bytes
    assert set(per) == {"bf16", "nvfp4", "nvfp4_cache", "shared"}
    assert engine.runner.layout.dtype == "bfloat16"  # one KV pool, in the model dtype, for both phases
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    linear_tensors = {id(t) for m in linears for t in m.impls.parameters()}
    shared = [p for p in model.parameters() if id(p) not in linear_tensors]
    assert len({p.data_ptr() for p in shared}) == len(shared)  # each shared tensor exists once
    assert model.lm_head.tied_to is model.model.embed_tokens  # SMALL ties lm_head to the embedding
    assert per["shared"] == sum(p.numel() * p.element_size() for p in shared)
    n_linear = sum(m.output_size * m.input_size for m in model.modules() if isinstance(m, LinearBase))
    assert per["bf16"] == 2 * n_linear
    assert n_linear * 9 // 16 < per["nvfp4"] < n_linear * 9 // 16 + 4096  # 4 bits + an e4m3 per 16
    assert per["nvfp4_cache"] == 4 * n_linear  # dequantized float32 weights of the emulated GEMM on CPU
    summary = engine.weight_summary()
    assert "bf16" in summary and "nvfp4" in summary and "shared" in summary


def test_every_sampled_token_comes_from_decode_precision(checkpoints, monkeypatch):
    """With NVFP4 prefill and BF16 decode, no logits row is sampled from a prefill (NVFP4) step."""
    bf16, _ = checkpoints
    engine = _engine(bf16, None, "nvfp4", "bf16", bf16_tail_tokens=1)
    phases = []
    forward = engine.runner.forward

    def spy(batch, precision, *args, **kwargs):
        logits = forward(batch, precision, *args, **kwargs)
        phases.append((precision, logits is not None))
        return logits

    monkeypatch.setattr(engine.runner, "forward", spy)
    tokens, _ = _engine_greedy(engine, PROMPT, 4)
    assert len(tokens) == 4
    assert all(p == "bf16" for p, sampled in phases if sampled) and ("nvfp4", False) in phases


def _kl_scores(model_path: str, tokenizer_path: str, conversations: int, max_context: int,
               max_reference: int, dtype: str = "bfloat16"):
    tok = Tokenizer.from_path(tokenizer_path)
    cases = accuracy.build_cases(tok, read_jsonl("agent_conversations.jsonl")[:conversations], max_context,
                                 max_reference)
    assert cases
    configs = tuple(c for c in accuracy.CONFIGS if "fp8" not in (c.prefill, c.decode))
    return accuracy.run(model_path, None, cases, dtype, greedy_tokens=4, tokenizer_path=tokenizer_path,
                        configs=configs)


def _assert_mixquant_better(results) -> None:
    mix = results["NVFP4 prefill + BF16 decode (Mix-Quant)"].row(4)
    e2e = results["NVFP4 e2e"].row(4)
    base = results["BF16 e2e"].row(4)
    assert base["kl"] == 0 and base["top1"] == 1
    assert 0 < mix["kl"] < 0.7 * e2e["kl"], (mix["kl"], e2e["kl"])
    assert mix["top1"] >= e2e["top1"]


def test_mixquant_kl_lower_than_nvfp4_e2e_random_qwen3(tmp_path, smollm_path):
    path = accuracy.random_qwen3(tmp_path, smollm_path, hidden=128, layers=2)
    _assert_mixquant_better(_kl_scores(path, smollm_path, conversations=2, max_context=700, max_reference=24))


@pytest.mark.slow
def test_mixquant_kl_lower_than_nvfp4_e2e_smollm(smollm_path):
    _assert_mixquant_better(_kl_scores(smollm_path, smollm_path, conversations=2, max_context=700,
                                       max_reference=24))


def test_harness_renders_cases_as_chat_continuations(smollm_path):
    tok = Tokenizer.from_path(smollm_path)
    convs = read_jsonl("agent_conversations.jsonl")
    cases = accuracy.build_cases(tok, convs, max_context=100_000, max_reference=10_000)
    assert len(cases) == sum(m["role"] == "assistant" for c in convs for m in c["messages"])
    end = tok.encode("<|im_end|>", add_special_tokens=False)
    for case in cases:
        assert tok.decode(case.context[-3:], skip_special_tokens=False).endswith("assistant\n")
        assert case.reference[-len(end):] == end  # the model must also predict the end of its turn
    assert any("<tool_call>" in tok.decode(c.reference) for c in cases)
    assert max(len(c.context) for c in cases) > 2000  # long tool outputs are fed back
