"""The quantized-prefill kernels one by one, at Qwen3-8B prefill shapes, against the limits of the same run.

    python benchmarks/quant_kernels.py [--tokens 2048,8192] [--out DIR] [--record]
    python benchmarks/quant_kernels.py --sweep [--tokens 2048,8192] [--out DIR] [--record]

Activation quantization (memory-bound): FP8 per token and NVFP4 quantize-dequantize (the exact-emulation
operand) over the four linear inputs of a layer (qkv/gate_up: hidden 4096; o_proj: 4096; down: 12288),
as GB/s of bytes read + written against the device-to-device copy bandwidth of this run (target: 70%).
Fused producers: RMSNorm + residual add (hidden) and SiLU-mul (intermediate) writing FP8 codes and
scales, or the folded NVFP4 operand, against the same op writing BF16 followed by the standalone
quantization (ms of both, and the fused kernel's GB/s).
GEMMs (arithmetic-bound): BF16 cuBLAS (`torch.mm`), FP8 `torch._scaled_mm` row-wise, and the exact-NVFP4
designs: cuBLAS BF16 on the dequantized weight with the activation's power-of-two scale folded into its
operand and the weight's global scale as alpha (the engine's choice when a weight has one global scale),
the Triton `scaled_mm` over the dequantized BF16 weight (epilogue scales per row and channel), the Triton
GEMM that decodes the packed 4.5-bit weight in registers, and cuBLAS BF16 with a float32 output plus a
separate scaling pass, in TFLOP/s against the BF16 peak of this run.
Timing: CUDA events, medians (triton.testing.do_bench); fresh random inputs, never zeros.
--sweep instead times the FP8 producers under each launch configuration of `kernels/tuning.py` (SiLU-mul -> FP8:
columns per step, including a block that holds the whole row, warps, and a persistent grid of a few programs
per SM; RMSNorm + residual -> FP8: warps; standalone FP8 per token: warps, rows per program, persistent grid),
checks that each writes the bits of the default configuration, times it as CUDA-graph replays (no host launch
overhead; L2 flushed before each, as everywhere here), and writes the fastest (least total time over --tokens)
to DIR/kernel_configs.json, the MIXQUANT_KERNEL_CONFIGS value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gpu_common import append_section, env_line, environment, fmt, limits, md_table

from mixquant_serve.quant.fp8 import quantize_fp8_per_channel
from mixquant_serve.quant.nvfp4 import dequantize_nvfp4_blocks, nvfp4_global_scale, quantize_nvfp4, tensor_amax

HIDDEN, INTER, QKV = 4096, 12288, 6144
GEMMS = {"qkv": (QKV, HIDDEN), "o_proj": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def quant_rows(t: int) -> list[list]:
    from mixquant_serve.kernels.fp8_quant import fp8_quantize_per_token
    from mixquant_serve.kernels.nvfp4_quant import nvfp4_quantize_dequantize

    rows = []
    for k in (HIDDEN, INTER):
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        fp8_ms = bench(lambda x=x: fp8_quantize_per_token(x))
        fp8_bytes = t * k * (2 + 1) + t * 4
        nv_ms = bench(lambda x=x: nvfp4_quantize_dequantize(x, None, out_dtype=torch.bfloat16))
        fold_ms = bench(lambda x=x: nvfp4_quantize_dequantize(x, None, out_dtype=torch.bfloat16, fold_global=True))
        nv_bytes = t * k * (2 + 2) + t * 4
        rows.append([t, k, "fp8 per token", fp8_ms, fp8_bytes / fp8_ms / 1e6])
        rows.append([t, k, "nvfp4 quant-dequant (bf16 operand)", nv_ms, nv_bytes / nv_ms / 1e6])
        rows.append([t, k, "nvfp4 quant-dequant, power-of-two scale folded (cuBLAS operand)", fold_ms,
                     nv_bytes / fold_ms / 1e6])
    return rows


def fused_rows(t: int) -> list[list]:
    from mixquant_serve.kernels.fp8_quant import fp8_quantize_per_token
    from mixquant_serve.kernels.nvfp4_quant import nvfp4_quantize_dequantize
    from mixquant_serve.kernels.rmsnorm import rmsnorm, rmsnorm_fp8, rmsnorm_nvfp4
    from mixquant_serve.kernels.silu_mul import silu_mul, silu_mul_fp8, silu_mul_nvfp4

    def nvfp4(y):
        return nvfp4_quantize_dequantize(y, None, out_dtype=torch.bfloat16, fold_global=True)

    x, r = (torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(t, 2 * INTER, device="cuda", dtype=torch.bfloat16)
    cases = [  # name, fused, unfused, bytes the fused kernel reads + writes
        ("rmsnorm + residual -> fp8", lambda: rmsnorm_fp8(x, w, 1e-6, r),
         lambda: fp8_quantize_per_token(rmsnorm(x, w, 1e-6, r)[0]), t * HIDDEN * (2 + 2 + 2 + 1) + t * 4),
        ("silu_mul -> fp8", lambda: silu_mul_fp8(gate_up), lambda: fp8_quantize_per_token(silu_mul(gate_up)),
         t * INTER * (4 + 1) + t * 4),
        ("rmsnorm + residual -> nvfp4 operand", lambda: rmsnorm_nvfp4(x, w, 1e-6, r),
         lambda: nvfp4(rmsnorm(x, w, 1e-6, r)[0]), t * HIDDEN * (2 + 2 + 2 + 2) + t * 4),
        ("silu_mul -> nvfp4 operand", lambda: silu_mul_nvfp4(gate_up), lambda: nvfp4(silu_mul(gate_up)),
         t * INTER * (4 + 2) + t * 4),
    ]
    rows = []
    for name, fused, unfused, nbytes in cases:
        fused_ms, unfused_ms = bench(fused), bench(unfused)
        rows.append([t, name, fused_ms, unfused_ms, nbytes / fused_ms / 1e6])
    return rows


def gemm_rows(t: int) -> list[list]:
    return [row for name, (n, k) in GEMMS.items() for row in one_gemm(t, name, n, k)]


def one_gemm(t: int, name: str, n: int, k: int) -> list[list]:
    from mixquant_serve.kernels.nvfp4_gemm import nvfp4_gemm
    from mixquant_serve.kernels.scaled_mm import scaled_mm

    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    w8, ws = quantize_fp8_per_channel(w)
    x8, xs = x.to(torch.float8_e4m3fn), torch.rand(t, 1, device="cuda") + 0.5
    wp, wbs = quantize_nvfp4(w, nvfp4_global_scale(tensor_amax(w)))
    wcache = dequantize_nvfp4_blocks(wp, wbs, dtype=torch.bfloat16)
    xq = dequantize_nvfp4_blocks(*quantize_nvfp4(x, nvfp4_global_scale(tensor_amax(x))), dtype=torch.bfloat16)
    rs, cs = torch.rand(t, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    zero = torch.zeros((), device="cuda", dtype=torch.bfloat16)
    cases = {
        "bf16 cuBLAS": lambda: torch.mm(x, w.T),
        "fp8 _scaled_mm row-wise": lambda: torch._scaled_mm(x8, w8.T, scale_a=xs, scale_b=ws.reshape(1, n),
                                                             out_dtype=torch.bfloat16),
        "nvfp4 exact: Triton scaled_mm, bf16 weight cache": lambda: scaled_mm(xq, wcache, rs, cs, None,
                                                                              out_dtype=torch.bfloat16),
        "nvfp4 exact: Triton GEMM on packed weight": lambda: nvfp4_gemm(xq, wp, wbs, rs, cs, None,
                                                                        out_dtype=torch.bfloat16),
        "nvfp4 exact: cuBLAS bf16, scale folded, weight scale as alpha": lambda: torch.addmm(
            zero, xq, wcache.T, beta=0, alpha=0.37),
        "nvfp4 exact: cuBLAS fp32 out + scale pass": lambda: (
            torch.mm(xq, wcache.T, out_dtype=torch.float32) * (rs[:, None] * cs)).to(torch.bfloat16),
    }
    flops = 2 * t * n * k
    return [[t, name, label, ms, flops / ms / 1e9] for label, ms in ((lb, bench(fn)) for lb, fn in cases.items())]


SWEEP = {  # SiLU-mul's blocks of 512 and 2 warps (8-42% slower than the best on an H200) are left out
    "silu_mul_fp8": [{"block": b, "num_warps": w} for b in (1024, 2048, 4096) for w in (4, 8, 16)]
    + [{"block": 16384, "num_warps": w} for w in (4, 8, 16, 32)]  # the row in registers, gate_up read once
    + [{"block": 4096, "num_warps": 8, "programs_per_sm": 4}]  # persistent (slower on an H200)
    + [{"block": 16384, "num_warps": w, "programs_per_sm": p} for w, p in ((8, 3), (16, 2))],
    "rmsnorm": [{"max_warps": w} for w in (2, 4, 8, 16)],
    "fp8_per_token": [{"num_warps": w} for w in (2, 4, 8, 16)]
    + [{"num_warps": w, "rows": r} for w, r in ((4, 2), (8, 2), (8, 4))]  # several rows a program
    + [{"num_warps": 4, "programs_per_sm": 16}, {"num_warps": 8, "rows": 2, "programs_per_sm": 8}],
}


def sweep_cases(t: int) -> dict[str, tuple]:
    """kernel -> (the call, bytes read + written) at t tokens of Qwen3-8B's shapes."""
    from mixquant_serve.kernels.fp8_quant import fp8_quantize_per_token
    from mixquant_serve.kernels.rmsnorm import rmsnorm_fp8
    from mixquant_serve.kernels.silu_mul import silu_mul_fp8

    gate_up = torch.randn(t, 2 * INTER, device="cuda", dtype=torch.bfloat16) * 2
    x, res = (torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5
    return {
        "silu_mul_fp8": (lambda: silu_mul_fp8(gate_up), t * (4 * INTER + INTER + 4)),
        "rmsnorm": (lambda: rmsnorm_fp8(x, w, 1e-6, res), t * (HIDDEN * 7 + 4)),
        "fp8_per_token": (lambda: fp8_quantize_per_token(x), t * (HIDDEN * 3 + 4)),
    }


def graphed(call):
    """`call` captured in a CUDA graph (its configuration is read at capture): replays time the kernel without the
    host's launch overhead, which at 2k tokens can exceed the kernel itself. Unchanged without CUDA (tests)."""
    if not torch.cuda.is_available():
        return call
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def _same_bits(a, b) -> bool:
    return all(torch.equal(u.view(torch.uint8), v.view(torch.uint8)) for u, v in zip(a, b, strict=True)
               if u is not None)


def sweep(tokens: list[int], copy_gbs: float) -> tuple[list[list], dict]:
    import json
    import os

    rows, total = [], {}
    for t in tokens:
        for name, (call, nbytes) in sweep_cases(t).items():
            os.environ.pop("MIXQUANT_KERNEL_CONFIGS", None)
            want = call()
            for cfg in SWEEP[name]:
                os.environ["MIXQUANT_KERNEL_CONFIGS"] = json.dumps({name: cfg})
                same = _same_bits(call(), want)
                ms = bench(graphed(call))
                key = json.dumps(cfg)
                total[name, key] = total.get((name, key), 0.0) + (ms if same else float("inf"))
                gbs = nbytes / ms / 1e6
                rows.append([t, name, key, ms, gbs, f"{100 * gbs / copy_gbs:.0f}%", "yes" if same else "NO"])
            os.environ.pop("MIXQUANT_KERNEL_CONFIGS", None)
        print(f"[quant_kernels] sweep at {t} tokens done", flush=True)
    best = {}
    for (name, key), _ms in sorted(total.items(), key=lambda kv: kv[1]):
        best.setdefault(name, json.loads(key))
    return rows, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,8192")
    p.add_argument("--out", default=None)
    p.add_argument("--record", action="store_true")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    p.add_argument("--sweep", action="store_true", help="time the FP8 producers' launch configurations instead")
    args = p.parse_args()
    torch.manual_seed(0)
    lim = limits("cuda")
    copy_gbs, peak = lim["copy"]["tbps"] * 1000, lim["peak"]["tflops"]
    if args.sweep:
        return report_sweep(args, lim, *sweep([int(x) for x in args.tokens.split(",")], copy_gbs))
    quant, fused, gemm = [], [], []
    for t in (int(x) for x in args.tokens.split(",")):
        quant += quant_rows(t)
        fused += fused_rows(t)
        gemm += gemm_rows(t)
        print(f"[quant_kernels] {t} tokens done", flush=True)
    q_table = md_table(["tokens", "K", "kernel", "ms", "GB/s", "of copy bandwidth"],
                       [[t, k, n, fmt(ms, 3), fmt(gbs, 0), f"{100 * gbs / copy_gbs:.0f}%"]
                        for t, k, n, ms, gbs in quant])
    f_table = md_table(["tokens", "op", "fused ms", "unfused ms", "fused GB/s", "of copy bandwidth"],
                       [[t, n, fmt(f, 3), fmt(u, 3), fmt(gbs, 0), f"{100 * gbs / copy_gbs:.0f}%"]
                        for t, n, f, u, gbs in fused])
    g_table = md_table(["tokens", "GEMM", "kernel", "ms", "TFLOP/s", "of bf16 peak"],
                       [[t, g, n, fmt(ms, 3), fmt(tf, 0), f"{100 * tf / peak:.0f}%"] for t, g, n, ms, tf in gemm])
    run = {"env": environment("cuda"), "limits": lim}
    text = f"{env_line(run)}\n\n{q_table}\n\n{f_table}\n\n{g_table}\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "quant_kernels.md").write_text(text)
    if args.record:
        append_section(Path(args.results), "Quantized-prefill kernels (one H200)", __doc__.split("\n\n")[1], text)


def report_sweep(args: argparse.Namespace, lim: dict, rows: list[list], best: dict) -> None:
    import json

    table = md_table(["tokens", "kernel", "launch config", "ms", "GB/s", "of copy bandwidth", "same bits"],
                     [[t, n, c, fmt(ms, 3), fmt(gbs, 0), pct, same] for t, n, c, ms, gbs, pct, same in rows])
    run = {"env": environment("cuda"), "limits": lim}
    text = (f"{env_line(run)}\n\n{table}\n\nFastest over all token counts (MIXQUANT_KERNEL_CONFIGS): "
            f"`{json.dumps(best)}`\n")
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "quant_kernels_sweep.md").write_text(text)
        Path(args.out, "kernel_configs.json").write_text(json.dumps(best))
    if args.record:
        append_section(Path(args.results), "FP8 producers: launch-config sweep (quant_kernels.py --sweep)",
                       "Each configuration of kernels/tuning.py, checked bit for bit against the default.", text)


if __name__ == "__main__":
    main()
