"""Accuracy of Mix-Quant on agent conversations: NVFP4 prefill + BF16 decode against the alternatives.

    python benchmarks/accuracy.py                        # SmolLM2-135M-Instruct (the embedded model)
    python benchmarks/accuracy.py --random-qwen3         # a small random Qwen3 (seeded)
    python benchmarks/accuracy.py --model-path DIR [--quantized-model-path DIR | --nvfp4-weights load]
    python benchmarks/accuracy.py --tails 1,16,64,256,turn [--fp8-tails 1,64]   # the BF16-tail sweep
    python benchmarks/accuracy.py --tails 1,16 --bf16-kv-proj    # ... with the prompt's K/V projections in BF16

The shipped multi-turn tool-using conversations (mixquant_serve/data/agent_conversations.jsonl) are
rendered with the model's chat template; every assistant turn is a case: its context is everything
before it, its reference continuation the shipped assistant message. For each configuration

    BF16 e2e | NVFP4 e2e | FP8 prefill + BF16 decode | NVFP4 prefill + BF16 decode (Mix-Quant)

the engine prefills each context in the prefill precision and then runs decode steps in the decode
precision, fed the reference tokens (teacher forcing; Mix-Quant runs the last --bf16-tail-tokens context
tokens in the decode precision, so every distribution comes from decode). Per decode step: KL(BF16 ||
config) of the next-token distributions, top-1 agreement with BF16, and the reference token's
log-likelihood (perplexity). A second pass generates greedily and counts the tokens that match BF16's
greedy output. NVFP4 weights are calibrated with `mixquant-serve quantize` (static activation scales;
cached under the mixquant cache) unless given or `--nvfp4-weights load` (quantize at load time, dynamic
activation scales).

One engine holds the BF16 and NVFP4 weights and serves three configurations (each sets the precision
of each phase); FP8 gets a second engine. Prefix caching is off, so every context is prefilled in the
configuration's prefill precision. Prints one table; writes it with model and machine into
benchmarks/RESULTS.md (its own section) unless --no-write.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mixquant_serve import Engine, SamplingParams
from mixquant_serve.config import ModelConfig
from mixquant_serve.data import read_jsonl
from mixquant_serve.layers.sampler import SampleOutput
from mixquant_serve.models.embedded import cache_dir, resolve_model_path
from mixquant_serve.tokenizer import Tokenizer

RESULTS = Path(__file__).with_name("RESULTS.md")
CONVERSATIONS = "agent_conversations.jsonl"
_HEADER = "# Benchmark results\n\nMeasured numbers, one section per benchmark; each names its script.\n"


@dataclass(frozen=True)
class RunConfig:
    name: str
    prefill: str
    decode: str
    # Mix-Quant's BF16 tail: prompt tokens at the end run in the decode precision; "turn": all the tokens
    # new since the previous assistant message; None: the engine's default (--bf16-tail-tokens)
    tail: int | str | None = None
    # prefill computes the k and v columns of every qkv projection in the decode precision (the engine's
    # --bf16-kv-proj); None: the engine's default
    kv_bf16: bool | None = None

    def tail_tokens(self, case: Case) -> int | None:
        return case.turn if self.tail == "turn" else self.tail


CONFIGS = (
    RunConfig("BF16 e2e", "bf16", "bf16"),
    RunConfig("NVFP4 e2e", "nvfp4", "nvfp4"),
    RunConfig("FP8 prefill + BF16 decode", "fp8", "bf16"),
    RunConfig("NVFP4 prefill + BF16 decode (Mix-Quant)", "nvfp4", "bf16"),
    RunConfig("Mix-Quant, the paper's split (BF16 tail 1 token, NVFP4 K/V projections)", "nvfp4", "bf16", 1, False),
)


def tail_name(tail: int | str) -> str:
    return "the whole last turn" if tail == "turn" else f"{tail} token{'s' if tail != 1 else ''}"


def tail_configs(tails: list[int | str], fp8_tails: list[int | str], kv_bf16: bool = False
                 ) -> tuple[RunConfig, ...]:
    """The sweeps set the K/V projections' precision explicitly: BF16 with kv_bf16, else NVFP4/FP8."""
    """The BF16-tail sweep: BF16 (the baseline), NVFP4 e2e when NVFP4 tails are swept, then each tail."""
    configs = [CONFIGS[0], *([CONFIGS[1]] if tails else [])]
    kv = ", K/V projections BF16" if kv_bf16 else ""
    configs += [RunConfig(f"Mix-Quant, BF16 tail {tail_name(t)}{kv}", "nvfp4", "bf16", t, kv_bf16) for t in tails]
    configs += [RunConfig(f"FP8 prefill, BF16 tail {tail_name(t)}", "fp8", "bf16", t, False) for t in fp8_tails]
    return tuple(configs)


def parse_tails(text: str) -> list[int | str]:
    tails = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tails if t != "turn" and not (t.isdigit() and int(t) >= 1)]
    if bad:
        raise argparse.ArgumentTypeError(f"a tail is a token count >= 1 or 'turn', got {bad[0]!r}")
    return [t if t == "turn" else int(t) for t in tails]


@dataclass
class Case:
    name: str
    context: list[int]
    reference: list[int]
    turn: int = 0  # context tokens after the previous assistant message (all of them on the first turn)


@dataclass
class Scores:
    kl: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    match: list[int] = field(default_factory=list)
    seconds: float = 0.0
    bf16_share: float = 0.0  # prompt tokens computed in BF16 / all prompt tokens (measured, no prefix reuse)
    reuse_share: float = 0.0  # the same share of each turn's new tokens (what a session with reuse computes)

    def row(self, greedy_tokens: int) -> dict[str, float]:
        n = max(1, len(self.kl))
        return {"kl": sum(self.kl) / n, "kl_p95": _quantile(self.kl, 0.95), "top1": sum(self.top1) / n,
                "ppl": math.exp(sum(self.nll) / max(1, len(self.nll))),
                "match": sum(self.match) / max(1, len(self.match)),
                "full": sum(m >= greedy_tokens for m in self.match) / max(1, len(self.match)),
                "seconds": self.seconds, "bf16_share": self.bf16_share, "reuse_share": self.reuse_share}


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q)) if values else 0.0


# -- conversations ----------------------------------------------------------------------------------
def _tool_call_text(call: dict) -> str:
    body = json.dumps({"name": call["name"], "arguments": call["arguments"]})
    return f"<tool_call>\n{body}\n</tool_call>"


def _flat_messages(conv: dict) -> list[dict]:
    """Messages for a template without tool support: schemas in the system prompt, calls as text."""
    tools = "\n".join(json.dumps(t) for t in conv["tools"])
    system = (f"{conv['system']}\n\n# Tools\nYou may call these functions:\n<tools>\n{tools}\n</tools>\n"
              "To call one, answer with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.")
    out = [{"role": "system", "content": system}]
    for m in conv["messages"]:
        content = m.get("content") or ""
        calls = [_tool_call_text(c) for c in m.get("tool_calls", [])]
        out.append({"role": m["role"], "content": "\n".join(filter(None, [content, *calls]))})
    return out


def _native_messages(conv: dict) -> list[dict]:
    """OpenAI-style messages for a template that renders tools and tool calls itself."""
    out = [{"role": "system", "content": conv["system"]}]
    for m in conv["messages"]:
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"type": "function", "function": c} for c in m["tool_calls"]]
        out.append(msg)
    return out


def build_cases(tokenizer: Tokenizer, conversations: list[dict], max_context: int,
                max_reference: int) -> list[Case]:
    """One case per assistant turn whose context fits `max_context` tokens."""
    cases = []
    for conv in conversations:
        native = tokenizer.template_supports_tools
        messages = _native_messages(conv) if native else _flat_messages(conv)
        tools = conv["tools"] if native else None
        before = 0  # tokens up to the end of the previous assistant message
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            context = tokenizer.apply_chat_template(messages[:i], tools, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tools, add_generation_prompt=False)
            if not full.startswith(context):
                raise ValueError(f"{conv['id']}: the chat template does not extend the context at turn {i}")
            ids = tokenizer.encode(context, add_special_tokens=False)
            ref = tokenizer.encode(full[len(context):].rstrip("\n"), add_special_tokens=False)
            if len(ids) <= max_context:
                cases.append(Case(f"{conv['id']}#{i}", ids, ref[:max_reference], len(ids) - before))
            before = len(tokenizer.encode(full, add_special_tokens=False))
    return cases


# -- engines ----------------------------------------------------------------------------------------
def make_engine(model_path: str, prefill: str, decode: str, quantized: str | None, dtype: str,
                max_tokens: int, context: int, tokenizer_path: str | None = None) -> Engine:
    quantized = quantized if "nvfp4" in (prefill, decode) else None
    return Engine(model_path, tokenizer_path=tokenizer_path, prefill_precision=prefill,
                  decode_precision=decode, quantized_model_path=quantized, dtype=dtype,
                  enable_prefix_caching=False, max_total_tokens=max_tokens, context_length=context)


def set_phases(engine: Engine, cfg: RunConfig) -> None:
    """Which held precision each phase runs (the engine reads this per step and per request)."""
    held = set(engine.runner.config.precisions)  # what the engine was built with
    if not {cfg.prefill, cfg.decode} <= held:
        raise ValueError(f"{cfg.name} needs {cfg.prefill}/{cfg.decode}; the engine holds {sorted(held)}")
    kv = engine.runner.config.bf16_kv_proj if cfg.kv_bf16 is None else cfg.kv_bf16
    engine.config = dataclasses.replace(engine.config, prefill_precision=cfg.prefill,
                                        decode_precision=cfg.decode, bf16_kv_proj=kv)


class ForcedSampler:
    """Feeds each request its reference tokens and hands every decode-step distribution to `sink`."""

    def __init__(self, references: dict[str, list[int]], sink) -> None:
        self.references, self.sink = references, sink

    def __call__(self, logits: torch.Tensor, reqs) -> SampleOutput:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        tokens = []
        for row, req in zip(logprobs, reqs, strict=True):
            step = len(req.output_ids)
            self.sink(req.rid, step, row)
            tokens.append(self.references[req.rid][step])
        return SampleOutput(tokens, [None] * len(reqs))


def _tokens_done(engine: Engine) -> int:
    return (engine.counters["computed_prefill_tokens"] + engine.scheduler.num_tail_tokens
            + engine.counters["generated_tokens"])


def _tail(cfg: RunConfig | None, case: Case) -> int | None:
    return None if cfg is None else cfg.tail_tokens(case)


def bf16_shares(cfg: RunConfig, engine: Engine, cases: list[Case], prefill_tokens: int) -> tuple[float, float]:
    """Prompt tokens computed in BF16: as a share of all context tokens (measured: what prefill did not
    compute), and of each turn's new tokens, which is what a session with prefix reuse computes (derived
    from the tail each turn gets). With `kv_bf16` these are shares of prompt linear FLOPs instead: the
    tail's, plus the k/v columns of the NVFP4-prefilled tokens."""
    if cfg.prefill == "bf16" or cfg.decode != "bf16":
        share = float(cfg.prefill == "bf16")
        return share, share
    total = sum(len(c.context) for c in cases)
    default = engine.config.bf16_tail_tokens
    tails = [min(c.turn, cfg.tail_tokens(c) or default) for c in cases]
    shares = 1 - prefill_tokens / total, sum(tails) / max(1, sum(c.turn for c in cases))
    kv = kv_flop_share(engine.runner.model_config) if engine.config.kv_proj_precision else 0.0
    return tuple(s + (1 - s) * kv for s in shares)


def kv_flop_share(cfg: ModelConfig) -> float:
    """The k and v projections' share of a token's linear FLOPs (qkv, o, gate_up, down; lm_head not counted)."""
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return 2 * kv / (q + 2 * kv + q + 3 * inter)


def _drive(engine: Engine, bar: tqdm, outputs: dict[str, list[int]] | None = None) -> None:
    """Step until idle (collecting tokens into `outputs`); the bar counts prefilled + generated tokens."""
    start, base = _tokens_done(engine), bar.n
    while engine.has_work:
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.rid} failed: {out.error}")
            if outputs is not None:
                outputs[out.rid] += out.token_ids
        bar.update(base + _tokens_done(engine) - start - bar.n)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tok", leave=False, file=sys.stderr, mininterval=1.0)


def _groups(cases: list[Case], size: int) -> list[list[int]]:
    """Case indices in groups of similar context length (the reference attention pads to the longest)."""
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].context))
    return [order[i : i + size] for i in range(0, len(order), size)]


def teacher_forced(engine: Engine, cases: list[Case], sink, desc: str, group: int,
                   cfg: RunConfig | None = None) -> None:
    refs = {str(i): c.reference for i, c in enumerate(cases)}
    inner, engine.sampler = engine.sampler, ForcedSampler(refs, sink)
    bar = _bar(sum(len(c.context) + len(c.reference) for c in cases), desc)
    try:
        for idx in _groups(cases, group):
            for i in idx:
                params = SamplingParams(max_tokens=len(cases[i].reference), temperature=0, ignore_eos=True)
                engine.add_request(str(i), cases[i].context, params, bf16_tail_tokens=_tail(cfg, cases[i]))
            _drive(engine, bar)
    finally:
        engine.sampler = inner
        bar.close()


def greedy(engine: Engine, cases: list[Case], tokens: int, desc: str, group: int,
           cfg: RunConfig | None = None) -> list[list[int]]:
    outputs: dict[str, list[int]] = {f"g{i}": [] for i in range(len(cases))}
    bar = _bar(sum(len(c.context) + tokens for c in cases), desc)
    for idx in _groups(cases, group):
        for i in idx:
            engine.add_request(f"g{i}", cases[i].context, SamplingParams(max_tokens=tokens, temperature=0),
                               bf16_tail_tokens=_tail(cfg, cases[i]))
        _drive(engine, bar, outputs)
    bar.close()
    return list(outputs.values())


# -- evaluation -------------------------------------------------------------------------------------
def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def evaluate(engine: Engine, cfg: RunConfig, cases: list[Case], baseline: dict | None,
             greedy_tokens: int, group: int = 8) -> tuple[Scores, dict]:
    """Scores of `cfg`; with baseline None, this is BF16 and its distributions become the baseline."""
    set_phases(engine, cfg)
    scores, keep = Scores(), {"rows": {}, "greedy": None}
    start = time.monotonic()

    def sink(rid: str, step: int, row: torch.Tensor) -> None:
        case = cases[int(rid)]
        scores.nll.append(-row[case.reference[step]].item())
        ref = row if baseline is None else baseline["rows"][(rid, step)]
        if baseline is None:
            keep["rows"][(rid, step)] = row.clone()
        scores.kl.append(torch.sum(ref.exp() * (ref - row)).clamp_min(0).item())
        scores.top1.append(bool(ref.argmax() == row.argmax()))

    prefilled = engine.counters["computed_prefill_tokens"]
    teacher_forced(engine, cases, sink, f"{cfg.name}: teacher-forced", group, cfg)
    scores.bf16_share, scores.reuse_share = bf16_shares(
        cfg, engine, cases, engine.counters["computed_prefill_tokens"] - prefilled)
    if greedy_tokens:
        outs = greedy(engine, cases, greedy_tokens, f"{cfg.name}: greedy", group, cfg)
        ref_outs = outs if baseline is None else baseline["greedy"]
        scores.match = [_common_prefix(o, r) if o != r else greedy_tokens
                        for o, r in zip(outs, ref_outs, strict=True)]
        keep["greedy"] = outs
    scores.seconds = time.monotonic() - start
    return scores, keep


def run(model_path: str, quantized: str | None, cases: list[Case], dtype: str, greedy_tokens: int,
        tokenizer_path: str | None = None, configs: tuple[RunConfig, ...] = CONFIGS) -> dict[str, Scores]:
    """Every configuration over `cases`; the first must be BF16 e2e (the baseline)."""
    needs = [len(c.context) + max(len(c.reference), greedy_tokens) + 1 for c in cases]
    max_tokens = sum(needs) + 16 * len(cases)
    results: dict[str, Scores] = {}
    baseline = None
    groups = [("nvfp4", [c for c in configs if "fp8" not in (c.prefill, c.decode)]),
              ("fp8", [c for c in configs if "fp8" in (c.prefill, c.decode)])]
    for quant, group in groups:
        if not group:
            continue
        _say(f"loading the engine with bf16 + {quant} weights")
        engine = make_engine(model_path, quant, "bf16", quantized, dtype, max_tokens, max(needs) + 16,
                             tokenizer_path)
        for cfg in group:
            _say(f"{cfg.name}: {len(cases)} cases")
            results[cfg.name], keep = evaluate(engine, cfg, cases, baseline, greedy_tokens)
            baseline = baseline or keep
        del engine
    return {c.name: results[c.name] for c in configs}


# -- NVFP4 weights ----------------------------------------------------------------------------------
def calibrated_checkpoint(model_path: str, samples: int, seq_len: int, folder: Path | None = None) -> str:
    """A Model Optimizer NVFP4 checkpoint of `model_path` made with `mixquant-serve quantize`, in `folder`
    or else once in the cache (keyed by model, calibration settings and texts)."""
    from mixquant_serve.quant.quantize_cli import CALIBRATION_FILE, quantize_checkpoint

    calib = json.dumps(read_jsonl(CALIBRATION_FILE))
    key = hashlib.sha256(f"{Path(model_path).resolve()}|{samples}|{seq_len}|{calib}".encode()).hexdigest()[:12]
    out = folder or cache_dir() / "quantized" / f"{Path(model_path).name}-nvfp4-{key}"
    if not (out / "hf_quant_config.json").is_file():
        quantize_checkpoint(model_path, str(out), samples, seq_len)
    return str(out)


def random_qwen3(folder: Path, tokenizer_path: str, hidden: int = 256, layers: int = 4) -> str:
    """A small Qwen3 with seeded random weights, BF16, sharing SmolLM2's vocabulary."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=49152, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=8192, rope_theta=1e6, tie_word_embeddings=True,
                      architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():  # larger than the default init, so that next-token distributions are peaked
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.4 if "embed" in name else 0.06)
    model.save_pretrained(folder)
    Tokenizer.from_path(tokenizer_path)  # fails early if the tokenizer is unusable
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(tokenizer_path) / name).is_file():
            (folder / name).write_bytes((Path(tokenizer_path) / name).read_bytes())
    return str(folder)


# -- report -----------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    n = torch.get_num_threads()
    return f"{name or platform.processor()} ({os.cpu_count()} cores), {n} torch thread{'s' if n > 1 else ''}"


def _ppl(value: float) -> str:
    return f"{value:.3f}" if value < 1e4 else f"{value:.3e}"


def table(results: dict[str, Scores], greedy_tokens: int) -> str:
    head = ("| configuration | KL vs BF16 (mean) | KL p95 | top-1 agree | greedy match "
            f"(of {greedy_tokens}) | full match | ref. PPL | time s |")
    lines = [head, "|" + "---|" * 8]
    for name, s in results.items():
        r = s.row(greedy_tokens)
        lines.append(f"| {name} | {r['kl']:.4f} | {r['kl_p95']:.4f} | {r['top1'] * 100:.1f}% | "
                     f"{r['match']:.1f} | {r['full'] * 100:.0f}% | {_ppl(r['ppl'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


LEGEND = ("KL: KL(P_BF16 || P_config) of the next-token distribution at each teacher-forced decode step, in "
          "nats (mean and 95th percentile over steps); top-1 agree: same argmax as BF16; greedy match: tokens "
          "of a free greedy continuation equal to BF16's before the first difference (mean), full match: "
          "turns whose greedy continuation equals BF16's throughout; ref. PPL: perplexity of the shipped "
          "assistant turns; time: wall time of both passes of the configuration.")


def section(model: str, settings: str, body: str) -> str:
    return (f"<!-- accuracy:{model}:start -->\n## Accuracy: {model} (benchmarks/accuracy.py)\n\n{settings}\n\n"
            f"{body}\n\n{LEGEND}\n<!-- accuracy:{model}:end -->\n")


def write_results(model: str, text: str) -> None:
    """Replace this model's accuracy section of RESULTS.md (or append it); other sections stay."""
    start, end = f"<!-- accuracy:{model}:start -->", f"<!-- accuracy:{model}:end -->\n"
    old = RESULTS.read_text() if RESULTS.is_file() else _HEADER
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def _say(message: str) -> None:
    print(f"[accuracy] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="BF16 HF folder (default: embedded SmolLM2-135M)")
    p.add_argument("--random-qwen3", action="store_true", help="evaluate a small seeded random Qwen3")
    p.add_argument("--quantized-model-path", default=None, help="NVFP4 checkpoint (Model Optimizer or "
                   "compressed-tensors); default: calibrate one (see --nvfp4-weights)")
    p.add_argument("--nvfp4-weights", choices=["calibrated", "load"], default="calibrated",
                   help="calibrated: `mixquant-serve quantize` (static activation scales); load: quantize at "
                        "load time (dynamic activation scales)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--max-context", type=int, default=2048, help="skip turns with longer contexts")
    p.add_argument("--max-reference", type=int, default=48, help="reference tokens scored per turn")
    p.add_argument("--greedy-tokens", type=int, default=24)
    p.add_argument("--conversations", type=int, default=0, help="use the first N conversations (0: all)")
    p.add_argument("--every", type=int, default=1, help="score every N-th assistant turn only (a smaller sample "
                   "with the same spread of context lengths, for a slow machine)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default; 1 avoids "
                   "OpenMP spin-waiting on a machine shared with other work)")
    p.add_argument("--tails", type=parse_tails, default=None, help="sweep Mix-Quant's BF16 tail instead: "
                   "comma-separated token counts and/or 'turn' (the whole last turn), e.g. 1,16,64,256,turn")
    p.add_argument("--fp8-tails", type=parse_tails, default=[], help="the same sweep for FP8 prefill")
    p.add_argument("--bf16-kv-proj", action="store_true", help="with --tails: NVFP4 prefill computes the k and v "
                   "columns of every qkv projection in BF16 (the engine's --bf16-kv-proj; the BF16 share then "
                   "counts FLOPs); without it the sweep's prefill computes them in NVFP4")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    smollm = resolve_model_path(None)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = (random_qwen3(Path(tmp) / "bf16", smollm) if args.random_qwen3
                      else resolve_model_path(args.model_path))
        model = "random Qwen3 (4 layers, hidden 256, seed 0)" if args.random_qwen3 else Path(model_path).name
        quantized, weights = args.quantized_model_path, "checkpoint " + str(args.quantized_model_path)
        if quantized is None and args.nvfp4_weights == "calibrated":
            folder = Path(tmp) / "nvfp4" if args.random_qwen3 else None  # no point caching a temporary model
            quantized = calibrated_checkpoint(model_path, args.calib_samples, args.calib_seq_len, folder)
            meta = json.loads((Path(quantized) / "mixquant_quantize.json").read_text())
            weights = (f"`mixquant-serve quantize` (Model Optimizer NVFP4_DEFAULT_CFG on {meta['calib_samples']} "
                       f"x {meta['calib_seq_len']} tokens of the shipped calibration texts; static activation "
                       "scales)")
        elif quantized is None:
            weights = "quantized at load time (dynamic per-batch activation scales)"
        tokenizer = Tokenizer.from_path(model_path)
        convs = read_jsonl(CONVERSATIONS)[: args.conversations or None]
        cases = build_cases(tokenizer, convs, args.max_context, args.max_reference)[:: args.every]
        _say(f"{model}: {len(cases)} assistant turns of {len(convs)} conversations, "
             f"{sum(len(c.context) for c in cases)} context tokens, {sum(len(c.reference) for c in cases)} "
             f"reference tokens")
        sweep = args.tails is not None or bool(args.fp8_tails)
        configs = tail_configs(args.tails or [], args.fp8_tails, args.bf16_kv_proj) if sweep else CONFIGS
        results = run(model_path, quantized, cases, args.dtype, args.greedy_tokens, configs=configs)
    if sweep:
        return _report_sweep(args, model, weights, cases, results)
    body = table(results, args.greedy_tokens)
    settings = (f"Model: {model}; dtype {args.dtype}; NVFP4 weights: {weights}.  \n"
                f"Machine: {cpu_name()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.  \n"
                f"Data: {len(convs)} agent conversations ({CONVERSATIONS}), {len(cases)} assistant turns "
                f"with contexts up to {args.max_context} tokens ({sum(len(c.context) for c in cases)} in "
                "all), "
                f"{args.max_reference} reference tokens per turn scored (teacher-forced decode steps), "
                f"{args.greedy_tokens} greedy tokens.")
    print(f"\n{settings}\n\n{body}\n")
    if not args.no_write:
        write_results(model, section(model, settings, body))
        _say(f"wrote {RESULTS}")
    return 0


def _report_sweep(args: argparse.Namespace, model: str, weights: str, cases: list[Case],
                  results: dict[str, Scores]) -> int:
    """The BF16-tail sweep: prints its table and saves its rows as JSON; `python benchmarks/tail_sweep.py`
    turns the saved sweeps into the RESULTS.md section and the plot."""
    import tail_sweep

    key = "-".join(([args.nvfp4_weights] if args.tails else []) + (["kvbf16"] if args.bf16_kv_proj else [])
                   + (["fp8"] if args.fp8_tails else [])
                   + ([f"every{args.every}"] if args.every > 1 else []) + [f"ref{args.max_reference}"])
    rows = [{"name": cfg.name, "prefill": cfg.prefill, "decode": cfg.decode, "tail": str(cfg.tail),
             **results[cfg.name].row(args.greedy_tokens)}
            for cfg in tail_configs(args.tails or [], args.fp8_tails, args.bf16_kv_proj)]
    settings = (f"Model: {model}; dtype {args.dtype}; NVFP4 weights: {weights}.  \n"
                f"Machine: {cpu_name()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.  \n"
                f"Data: {len(cases)} assistant turns (every {args.every}. one) of the shipped agent conversations "
                f"with contexts up to "
                f"{args.max_context} tokens ({sum(len(c.context) for c in cases)} context tokens, "
                f"{sum(c.turn for c in cases)} of them new in their turn), {args.max_reference} reference tokens "
                "per turn scored (teacher-forced decode steps).")
    body = tail_sweep.table(rows)
    print(f"\n{settings}\n\n{body}\n")
    if not args.no_write:
        _say(f"wrote {tail_sweep.save(model, key, settings, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
