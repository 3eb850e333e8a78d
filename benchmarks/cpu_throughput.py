"""Offline batch generation on CPU: mixquant-serve's Engine against Hugging Face transformers `generate`,
same model, same prompts, same machine, same run.

    .venv/bin/python benchmarks/cpu_throughput.py [--prompts 32 --prompt-len 512 --new-tokens 128]

Prints generated tokens/s of both and their ratio, and appends the row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## CPU offline throughput (benchmarks/cpu_throughput.py)"
HEADER = ("| date | CPU | threads | model | dtype | prompts x prompt len x new tokens | engine tok/s "
          "| HF tok/s | ratio |\n|---|---|---|---|---|---|---|---|---|")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        return f"{name} ({torch.get_num_threads()} threads)"
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def make_prompts(vocab: int, special: frozenset[int], n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (n, length), generator=g)
    return [[t if t not in special else 100 for t in row.tolist()] for row in ids]


def run_engine(model_path: str, prompts: list[list[int]], new_tokens: int, args: argparse.Namespace) -> float:
    from mixquant_serve import Engine, SamplingParams

    engine = Engine(model_path, prefill_precision="bf16", decode_precision="bf16",
                    max_running_requests=len(prompts), chunked_prefill_size=args.chunk,
                    context_length=args.prompt_len + new_tokens + 16,
                    max_total_tokens=len(prompts) * (args.prompt_len + new_tokens + 32))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate([prompts[0][:32]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return elapsed


def run_hf(model_path: str, prompts: list[list[int]], new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # generate all new tokens, like ignore_eos
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(ids[:1, :32], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def append_row(row: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n\n{HEADER}\n"
    lines = text.splitlines()
    at = lines.index(SECTION) + 3
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    lines.insert(at, row)
    RESULTS.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunk", type=int, default=4096, help="engine's chunked prefill budget")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mixquant_serve.models.embedded import EMBEDDED_NAME, resolve_model_path
    from mixquant_serve.tokenizer import Tokenizer

    path = resolve_model_path(args.model_path)
    tok = Tokenizer.from_path(path)
    prompts = make_prompts(tok.vocab_size, tok.special_token_ids, args.prompts, args.prompt_len, seed=0)
    generated = args.prompts * args.new_tokens
    print(f"[bench] {args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens each, "
          f"on {cpu_name()}", flush=True)
    print("[bench] mixquant-serve Engine ...", flush=True)
    t_engine = run_engine(path, prompts, args.new_tokens, args)
    print(f"[bench]   {t_engine:.1f} s, {generated / t_engine:.1f} generated tok/s", flush=True)
    print("[bench] transformers generate ...", flush=True)
    t_hf = run_hf(path, prompts, args.new_tokens)
    print(f"[bench]   {t_hf:.1f} s, {generated / t_hf:.1f} generated tok/s", flush=True)
    ratio = t_hf / t_engine
    print(f"[bench] engine / HF throughput: {ratio:.2f}x", flush=True)
    model = EMBEDDED_NAME if not args.model_path else Path(path).name
    row = (f"| {date.today()} | {cpu_name()} | {torch.get_num_threads()} | {model} | bf16 | {args.prompts} x "
           f"{args.prompt_len} x {args.new_tokens} | {generated / t_engine:.1f} | {generated / t_hf:.1f} | "
           f"{ratio:.2f}x |")
    if not args.no_write:
        append_row(row)
        print(f"[bench] row appended to {RESULTS}")
    sys.exit(0)


if __name__ == "__main__":
    main()
