"""The small-M GEMV (kernels/gemv.py) at Qwen3-8B decode shapes against cuBLAS, on one GPU.

    python benchmarks/gemv_speed.py [--m 1,4] [--reps 36] [--configs]
    TRITON_INTERPRET=1 python benchmarks/gemv_speed.py --smoke       (tiny shapes on CPU: checks the script)

For M rows and each decode GEMM of a layer (qkv, o_proj, gate_up, down) it times: cuBLAS (F.linear) alone;
cuBLAS preceded by the separate kernel that the fused GEMV replaces (kernels/rmsnorm.py with the residual before
qkv and gate_up, kernels/silu_mul.py before down); our plain gemv; our fused variant. Each is timed bare
(triton.testing.do_bench: CUDA events, median, L2 flushed before each call) and as one CUDA graph of --reps
repetitions on distinct weights, like a decode graph over the layers (ms per repetition, launch overhead gone).
GB/s counts the weight plus the activations that the fused op reads and writes (the same bytes for every row of
a shape, so rows compare as effective bandwidth); "% copy" is that against the device-to-device copy bandwidth
of the same run (1 GiB, bytes read + written), from the graph's time (the bare one without CUDA). Bare times
include CPU launch cost that the L2 flush does not hide (on an H200 the small Triton kernels read ~45 us bare
against 12-17 us in a graph); the graphs are what a decode step runs.
--configs instead times each shape's kernel (the fused one where there is one) under a list of launch
configurations (CUDA graphs as above), checks each against the default's output, and prints the fastest per shape.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _gpu_common import copy_bandwidth, environment, fmt, log, md_table

from mixquant_serve.kernels.gemv import MAX_M, GemvLaunch, default_launch, gemv, rmsnorm_gemv, silu_mul_gemv
from mixquant_serve.kernels.rmsnorm import rmsnorm
from mixquant_serve.kernels.silu_mul import silu_mul

EPS = 1e-6
# name: (N, K, prologue); Qwen3-8B: hidden 4096, 32 + 2 * 8 heads of 128, intermediate 12288
SHAPES = {"qkv": (6144, 4096, "rmsnorm"), "o_proj": (4096, 4096, None), "gate_up": (24576, 4096, "rmsnorm"),
          "down": (4096, 12288, "silu_mul")}
SMOKE_SHAPES = {"qkv": (96, 64, "rmsnorm"), "o_proj": (64, 64, None), "gate_up": (160, 64, "rmsnorm"),
                "down": (64, 96, "silu_mul")}
# (block_n, block_k, num_warps, num_stages); a stage of a weight tile is block_n * block_k * 2 bytes of shared memory
SWEEP = [GemvLaunch(bn, bk, w, s) for bn in (16, 32, 64) for bk in (256, 512) for w, s in ((4, 3), (8, 3), (4, 4))
         if bn * bk * 2 * s <= 160 * 1024]


class Case:
    """One shape at M rows: inputs, one weight per repetition, and the ops to time on weight i."""

    def __init__(self, m: int, n: int, k: int, prologue: str | None, reps: int, device: str, dtype: torch.dtype):
        def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, device=device) * scale).to(dtype)

        self.n, self.k, self.prologue = n, k, prologue
        self.weights = [rand(n, k, scale=k**-0.5) for _ in range(reps)]
        self.x = rand(m, 2 * k if prologue == "silu_mul" else k)
        self.residual, self.norm_weight = rand(m, k), rand(k)
        self.residual_out = torch.empty_like(self.residual)
        self.plain_x = self.x[:, :k]

    def ops(self, launch: GemvLaunch | None = None) -> dict[str, Callable[[int], torch.Tensor]]:
        """name -> fn(weight index) for the rows of the table (fused ones only where the shape has a producer)."""
        w = self.weights
        ops = {"cuBLAS": lambda i: F.linear(self.plain_x, w[i]),
               "gemv": lambda i: gemv(self.plain_x, w[i], launch=launch)}
        if self.prologue == "rmsnorm":
            ops["rmsnorm + cuBLAS"] = lambda i: F.linear(rmsnorm(self.x, self.norm_weight, EPS, self.residual)[0], w[i])
            ops["rmsnorm_gemv"] = lambda i: rmsnorm_gemv(self.x, self.residual, self.norm_weight, EPS, w[i],
                                                         residual_out=self.residual_out, launch=launch)
        elif self.prologue == "silu_mul":
            ops["silu_mul + cuBLAS"] = lambda i: F.linear(silu_mul(self.x), w[i])
            ops["silu_mul_gemv"] = lambda i: silu_mul_gemv(self.x, w[i], launch=launch)
        return ops

    def fused(self, launch: GemvLaunch | None = None) -> Callable[[int], torch.Tensor]:
        ops = self.ops(launch)
        return ops.get("rmsnorm_gemv", ops.get("silu_mul_gemv", ops["gemv"]))

    def nbytes(self) -> int:
        """Weight + the fused op's activations: x (and residual in, h out) or gate_up, and the output."""
        m, e = self.x.shape[0], self.x.element_size()
        act = {"rmsnorm": 3 * m * self.k, "silu_mul": 2 * m * self.k, None: m * self.k}[self.prologue]
        return (self.n * self.k + act + m * self.n) * e


def bench(fn: Callable[[], object]) -> float:
    """Milliseconds per call: do_bench's median on CUDA; a few wall-clock calls on CPU (smoke only)."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e3


def graph_ms(op: Callable[[int], torch.Tensor], reps: int) -> float | None:
    """ms per repetition of a CUDA graph that runs op on weights 0..reps-1 (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    op(0)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            op(i)
    return bench(graph.replay) / reps


def check(case: Case, ops: dict[str, Callable[[int], torch.Tensor]]) -> None:
    """Every op's output against the float64 reference of the fused op's inputs (bf16-sized tolerance)."""
    if case.prologue == "rmsnorm":
        a = rmsnorm(case.x, case.norm_weight, EPS, case.residual)[0]
    else:
        a = silu_mul(case.x) if case.prologue == "silu_mul" else case.plain_x
    want = a.double() @ case.weights[0].double().T
    for name, op in ops.items():
        got = op(0).double()
        ref = case.plain_x.double() @ case.weights[0].double().T if name in ("cuBLAS", "gemv") else want
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        if err > 2e-2:
            raise AssertionError(f"{name}: relative error {err:.3g} against the float64 reference")


def table_rows(m: int, name: str, case: Case, reps: int, copy_gbps: float) -> list[list]:
    ops = case.ops()
    check(case, ops)
    rows = []
    for op_name, op in ops.items():
        bare = bench(lambda op=op: op(0))
        graph = graph_ms(op, reps)
        gbps = case.nbytes() / (graph or bare) / 1e6
        rows.append([m, name, case.n, case.k, op_name, fmt(bare, 4), fmt(graph, 4), fmt(gbps, 0),
                     fmt(100 * gbps / copy_gbps, 0)])
        log("gemv", f"M={m} {name} {op_name}: bare {bare:.4f} ms, graph {fmt(graph, 4)} ms/rep, {gbps:.0f} GB/s")
    return rows


def sweep_rows(m: int, name: str, case: Case, reps: int, copy_gbps: float) -> list[list]:
    """The shape's kernel under each SWEEP configuration (CUDA graph, ms per repetition), checked against the
    default's output; all are compiled and checked before any is timed, so that the GPU runs at its clocks."""
    want = case.fused()(0).float()
    ops = [(cfg, case.fused(cfg)) for cfg in SWEEP]
    for cfg, op in ops:
        torch.testing.assert_close(op(0).float(), want, rtol=2e-2, atol=2e-2, msg=lambda e, cfg=cfg: f"{cfg}: {e}")
    default_ms = graph_ms(case.fused(), reps) or bench(lambda: case.fused()(0))
    timed = sorted(((graph_ms(op, reps) or bench(lambda op=op: op(0))), cfg) for cfg, op in ops)
    for ms, cfg in timed[:3]:
        log("configs", f"M={m} {name} {tuple(cfg)}: {ms:.4f} ms (default {default_ms:.4f})")
    return [[m, name, rank, str(tuple(cfg)), fmt(ms, 4), fmt(case.nbytes() / ms / 1e6 / copy_gbps * 100, 0),
             fmt(default_ms, 4)] for rank, (ms, cfg) in enumerate(timed[:3], 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="1,4", help="rows (comma-separated)")
    p.add_argument("--reps", type=int, default=36, help="repetitions (distinct weights) in the CUDA graph")
    p.add_argument("--configs", action="store_true", help="sweep launch configurations instead")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (needs TRITON_INTERPRET=1)")
    args = p.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    ms = [int(v) for v in args.m.split(",")]
    if not all(1 <= m <= MAX_M for m in ms):
        p.error(f"--m: rows from 1 to kernels/gemv.py's MAX_M = {MAX_M}")
    device, dtype = ("cpu", torch.float16) if args.smoke else ("cuda", torch.bfloat16)
    shapes, reps = (SMOKE_SHAPES, 2) if args.smoke else (SHAPES, args.reps)
    env = environment(device)
    copy_gbps = copy_bandwidth(device)["tbps"] * 1e3
    log("gemv", f"{env['device']}; torch {env['torch']}, triton {env['triton']}; copy {copy_gbps:.0f} GB/s")
    rows = []
    for m in ms:
        for name, (n, k, prologue) in shapes.items():
            case = Case(m, n, k, prologue, reps, device, dtype)
            measure = sweep_rows if args.configs else table_rows
            rows += measure(m, name, case, reps, copy_gbps)
            del case
    print(f"\n{env['date']}: {env['device']}; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
          f"{dtype}; same-run device-to-device copy {copy_gbps:.0f} GB/s (bytes read + written)\n")
    if args.configs:
        print(md_table(["M", "shape", "rank", "(block_n, block_k, warps, stages)", f"graph ms/rep ({reps})",
                        "% copy", "default"], rows))
    else:
        print(md_table(["M", "shape", "N", "K", "op", "bare ms", f"graph ms/rep ({reps})", "GB/s", "% copy"], rows))
    if not args.smoke:
        print("defaults:", {f"M={m} {name}": tuple(default_launch(m, n, k)) for m in ms
                            for name, (n, k, _) in shapes.items()})


if __name__ == "__main__":
    main()
