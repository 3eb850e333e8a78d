"""FP8 GEMM with and without fast accumulation: speed, and error against a float64 product of the same operands.

    python benchmarks/fp8_accumulation.py [--tokens 2048,8192] [--out DIR] [--record]
    python benchmarks/fp8_accumulation.py --smoke          # tiny shapes on CPU: the script runs

On Hopper, FP8 tensor-core products accumulate in reduced precision; cuBLAS promotes partial sums to float32
every few K steps unless ``use_fast_accum`` is set (the engine's --fp8-fast-accum). For the four linear layers of
a Qwen3-8B layer at prefill token counts, with the engine's operands (weights quantized per channel, activations
per token, both from random BF16 tensors shaped like trained ones), this times ``torch._scaled_mm`` row-wise both
ways and measures each output's error against float64 arithmetic on the same FP8 codes and scales: relative
Frobenius error, and the largest error in units of the output's RMS. BF16 rounding of the output alone gives
~2e-3 relative error: that is the floor. For scale, the last column is what FP8 quantization itself costs: the
(precise) FP8 output's relative error against the float64 product of the BF16 operands before quantization.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gpu_common import append_section, env_line, environment, fmt, limits, md_table

from mixquant_serve.quant.fp8 import quantize_fp8_per_channel, quantize_fp8_per_token

GEMMS = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
SMOKE_GEMMS = {"qkv": (96, 64), "down": (64, 192)}
SECTION = "## FP8 fast accumulation (benchmarks/fp8_accumulation.py)"


def bench(fn, device: str) -> float:
    if device == "cpu":
        import time

        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def one_gemm(t: int, n: int, k: int, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(t + n + k)
    # activations with outlier channels and a spread of row magnitudes, weights ~N(0, 0.02)
    x = torch.randn(t, k, device=device, generator=gen) * (1 + 4 * (torch.rand(k, device=device, generator=gen) > 0.99))
    x = (x * torch.exp(torch.randn(t, 1, device=device, generator=gen) * 0.5)).to(torch.bfloat16)
    w = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    x8, xs = quantize_fp8_per_token(x)
    w8, ws = quantize_fp8_per_channel(w)
    ref = (x8.double() * xs.double()) @ (w8.double() * ws.double()[:, None]).T
    rms = ref.pow(2).mean().sqrt()
    bf16_ref = x.double() @ w.double().T
    out = {}
    for mode, fast in (("precise", False), ("fast", True)):
        def call(fast=fast):
            return torch._scaled_mm(x8, w8.T, scale_a=xs, scale_b=ws.reshape(1, n), out_dtype=torch.bfloat16,
                                    use_fast_accum=fast)

        err = call().double() - ref
        out[mode] = {"ms": bench(call, device), "rel_err": float(err.norm() / ref.norm()),
                     "max_err_rms": float(err.abs().max() / rms)}
    precise = torch._scaled_mm(x8, w8.T, scale_a=xs, scale_b=ws.reshape(1, n), out_dtype=torch.bfloat16)
    out["quant_rel_err"] = float((precise.double() - bf16_ref).norm() / bf16_ref.norm())
    out["tflops"] = {m: 2 * t * n * k / out[m]["ms"] / 1e9 for m in ("precise", "fast")}
    return out


def measure(tokens: list[int], gemms: dict, device: str) -> list[dict]:
    rows = []
    for t in tokens:
        for name, (n, k) in gemms.items():
            rows.append({"tokens": t, "gemm": name, "n": n, "k": k, **one_gemm(t, n, k, device)})
            print(f"[fp8_accumulation] {t} tokens, {name} done", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ["tokens", "GEMM", "precise ms", "fast ms", "fast speed-up", "precise TFLOP/s", "fast TFLOP/s",
            "precise rel. error", "fast rel. error", "precise max error / RMS", "fast max error / RMS",
            "FP8 quantization rel. error"]
    body = [[r["tokens"], r["gemm"], fmt(r["precise"]["ms"], 3), fmt(r["fast"]["ms"], 3),
             fmt(r["precise"]["ms"] / r["fast"]["ms"]), fmt(r["tflops"]["precise"], 0), fmt(r["tflops"]["fast"], 0),
             f"{r['precise']['rel_err']:.2e}", f"{r['fast']['rel_err']:.2e}", f"{r['precise']['max_err_rms']:.2e}",
             f"{r['fast']['max_err_rms']:.2e}", f"{r['quant_rel_err']:.2e}"] for r in rows]
    total = {m: sum(r[m]["ms"] for r in rows) for m in ("precise", "fast")}
    return md_table(head, body) + (f"\nAll GEMMs: {total['precise']:.3f} ms precise, {total['fast']:.3f} ms fast "
                                   f"({total['precise'] / total['fast']:.2f}x).\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,8192")
    p.add_argument("--out", default=None)
    p.add_argument("--record", action="store_true", help="append the table to --results")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks that the script runs)")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    tokens = [16] if args.smoke else [int(x) for x in args.tokens.split(",")]
    run = {"env": environment(device), "limits": limits(device)}
    rows = measure(tokens, SMOKE_GEMMS if args.smoke else GEMMS, device)
    text = env_line(run) + "\n\n" + table(rows)
    print(text, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "fp8_accumulation.md").write_text(text)
    if args.record:
        append_section(Path(args.results), SECTION, "torch._scaled_mm row-wise, use_fast_accum off and on.", text)


if __name__ == "__main__":
    main()
