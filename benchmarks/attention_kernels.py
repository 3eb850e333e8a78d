"""Attention backends on one layer of a Llama-3-8B-shaped KV cache: Triton against the PyTorch reference.

    python benchmarks/attention_kernels.py [--out DIR] [--block-n 64 --num-warps 4 --num-stages 2]
    python benchmarks/attention_kernels.py --sweep [--out DIR]   # the decode kernel's launch configurations
    TRITON_INTERPRET=1 python benchmarks/attention_kernels.py --smoke [--sweep]   # tiny shapes on CPU: it runs

Decode (B rows, each ctx keys; pages shuffled as in a long-running pool): the backend forward (K/V write +
attention) of TritonBackend replayed in a CUDA graph over static metadata, the bare kernel with the
given launch parameters and with one split, and TorchRefBackend's forward (the peer). The limit is the
time to read the K/V bytes at the bandwidth of a same-run device-to-device copy.
Extend (B sequences of `new` tokens after a cached `prefix`): TritonBackend's forward with the Triton
kernel (its default KV splits), the bare kernel with one split, the forward with SDPA where it applies
(one sequence, no prefix), and TorchRefBackend's (the peer); the limit
is the causal FLOPs at the dense BF16 peak given by --peak-tflops (989 for an H100/H200 SXM).
--sweep instead times, per decode case, the backend's decode forward (attention + merge; K/V already stored, as
the engine runs it) under each launch configuration of kernels/tuning.py's "decode_attention" entry (keys per
step, warps, stages, the split policy), replayed in a CUDA graph over enough layers that their K/V is several
times the L2, as a decode step reads it; each configuration's output is checked against the default's. It
prints the fastest few per case (ms a layer, GB/s, share of the same-run copy bandwidth) and the configuration
with the best geometric-mean speed-up over all cases, as a MIXQUANT_KERNEL_CONFIGS value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import triton

from mixquant_serve.config import KVLayout
from mixquant_serve.kernels.decode_attention import decode_attention
from mixquant_serve.kernels.extend_attention import extend_attention
from mixquant_serve.kernels.tuning import DEFAULTS, ENV, config
from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.layers.attention.base import SeqSlice
from mixquant_serve.layers.attention.torch_ref import TorchRefBackend
from mixquant_serve.layers.attention.triton_backend import TritonBackend

H, HKV, D, PAGE = 32, 8, 128, 16
DECODE = [(1, 4096), (8, 4096), (32, 2048), (64, 4096), (128, 1024), (8, 32768)]
EXTEND = [(1, 0, 2048), (1, 0, 8192), (1, 8192, 512), (1, 16384, 64), (8, 4096, 128), (16, 0, 512), (4, 2048, 3)]
SMOKE_DECODE, SMOKE_EXTEND = [(3, 40)], [(1, 0, 20), (2, 16, 5)]
SWEEP_DECODE, SMOKE_SWEEP_DECODE = [(1, 1024), (1, 8192), (1, 32768), (8, 4096), (64, 1024)], [(1, 40), (3, 100)]
# split policies: 32 / 64 / 128 splits at batch 1 on 132 SMs (5 / 9 / 17 at batch 8, 1 / 2 / 3 at batch 64)
SPLITS = [{"split_cap": 32, "programs_per_sm": 2}, {"split_cap": 64, "programs_per_sm": 4},
          {"split_cap": 128, "programs_per_sm": 8}]
# every configuration launches split and unsplit batches alike (split_block_n / split_num_stages 0)
SAME = {"split_block_n": 0, "split_num_stages": 0}
SWEEP = [{"block_n": n, "num_warps": w, "num_stages": st, **sp, **SAME} for n in (32, 64, 128) for w in (4, 8)
         for st in (2, 3, 4) for sp in SPLITS if n > 32 or w == 4]  # 8 warps on 32 keys a step: too little work
# on CPU the backend counts one SM: many programs a "SM" to get several splits (1 and 2 of them at batch 3)
SMOKE_SWEEP = [{"block_n": 16, "num_warps": 2, "num_stages": 3, "split_cap": 4, "programs_per_sm": 64, **SAME},
               {"block_n": 32, "num_warps": 8, "num_stages": 1, "split_cap": 3, "programs_per_sm": 16, **SAME}]
SWEEP_REP_MS, TOP = 10, 5


def bench(fn: Callable[[], object], graph: bool = False, rep: int = 200) -> float:
    """Milliseconds per call (median of triton's do_bench on CUDA; a short wall-clock loop elsewhere)."""
    if not torch.cuda.is_available():
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - start) / 3 * 1e3
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep)
    return triton.testing.do_bench(fn, warmup=25, rep=rep)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a same-run device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench(lambda: dst.copy_(src)) / 1e3)


def backends(tokens: int, device: torch.device, dtype: torch.dtype, layers: int = 1, **kw: object):
    layout = KVLayout(layers, HKV, D, PAGE, str(dtype).removeprefix("torch."))
    storage = KVStorage(layout, tokens // PAGE + 2, device)
    for c in storage.k + storage.v:
        c.normal_()
    return storage, TritonBackend(storage, H, HKV, D, device, **kw), TorchRefBackend(storage, H, HKV, D, device)


def shuffled_pages(storage: KVStorage, rows: list[int], gen: torch.Generator) -> list[list[int]]:
    perm = (torch.randperm(storage.num_pages - 1, generator=gen) + 1).tolist()
    out, used = [], 0
    for n in rows:
        k = -(-n // PAGE)
        out.append(perm[used : used + k])
        used += k
    return out


def qkv(t: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(t, h, D, device=device, dtype=dtype) for h in (H, HKV, HKV))


def decode_row(b: int, ctx: int, device: torch.device, dtype: torch.dtype, launch: dict[str, int]) -> dict:
    storage, tri, ref = backends(b * ctx + PAGE * b, device, dtype)
    pages = shuffled_pages(storage, [ctx] * b, torch.Generator().manual_seed(b))
    seqs = [SeqSlice(p, ctx - 1, 1) for p in pages]
    q, k, v = qkv(b, device, dtype)
    static = tri.static_decode_meta(b, len(pages[0]))
    meta = tri.load_decode_meta(static, seqs, b)
    ref_meta = ref.plan(seqs)
    kc, vc = storage.flat(0)
    row = {"case": f"decode B={b} ctx={ctx}", "splits": meta.num_splits}
    row["triton_graph_ms"] = bench(lambda: tri.forward(0, q, k, v, meta), graph=device.type == "cuda")
    row["kernel_ms"] = bench(lambda: decode_attention(q, kc, vc, meta.page_table, meta.seq_lens, PAGE, D**-0.5,
                                                      meta.num_splits, **launch))
    row["kernel_1split_ms"] = bench(lambda: decode_attention(q, kc, vc, meta.page_table, meta.seq_lens, PAGE,
                                                             D**-0.5, 1, **launch))
    row["torch_ref_ms"] = bench(lambda: ref.forward(0, q, k, v, ref_meta))
    row["kv_bytes"] = 2 * b * ctx * HKV * D * q.element_size()
    return row


def extend_row(b: int, prefix: int, new: int, device: torch.device, dtype: torch.dtype, peak: float) -> dict:
    storage, tri, ref = backends(b * (prefix + new) + PAGE * b, device, dtype, sdpa_prefill=False)
    pages = shuffled_pages(storage, [prefix + new] * b, torch.Generator().manual_seed(new))
    seqs = [SeqSlice(p, prefix, new) for p in pages]
    q, k, v = qkv(b * new, device, dtype)
    meta, ref_meta = tri.plan(seqs), ref.plan(seqs)
    row = {"case": f"extend B={b} prefix={prefix} new={new}", "splits": meta.num_splits}
    row["triton_ms"] = bench(lambda: tri.forward(0, q, k, v, meta))
    kc, vc = storage.flat(0)
    row["kernel_1split_ms"] = bench(lambda: extend_attention(q, kc, vc, meta.page_table, meta.q_start_loc,
                                                             meta.prefix_lens, meta.seq_lens, PAGE, D**-0.5,
                                                             meta.max_q_len))
    if b == 1 and prefix == 0:
        tri.sdpa_prefill = True
        sdpa_meta = tri.plan(seqs)
        row["sdpa_ms"] = bench(lambda: tri.forward(0, q, k, v, sdpa_meta))
    row["torch_ref_ms"] = bench(lambda: ref.forward(0, q, k, v, ref_meta))
    flops = 4 * b * H * D * (new * prefix + new * (new + 1) / 2)
    row["limit_ms"] = flops / (peak * 1e12) * 1e3
    return row


@contextmanager
def decode_config(cfg: dict[str, int]) -> Iterator[None]:
    """MIXQUANT_KERNEL_CONFIGS with "decode_attention" set to cfg (other kernels' overrides kept); restored after."""
    old = os.environ.get(ENV)
    os.environ[ENV] = json.dumps({**json.loads(old or "{}"), "decode_attention": cfg})
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV)
        else:
            os.environ[ENV] = old


def graph_layers(kv_bytes: int, device: torch.device) -> int:
    """Layers replayed back to back: at least 256 MiB of K/V (over 4x an H200's L2), at most Qwen3-8B's 36."""
    return max(2, min(36, -(-(256 << 20) // kv_bytes))) if device.type == "cuda" else 1


def sweep_case(b: int, ctx: int, device: torch.device, dtype: torch.dtype, configs: list[dict[str, int]]) -> dict:
    """Per configuration: ms a layer of the backend's decode forward in a CUDA graph, its split count, and whether
    its output matches the first configuration's (relative L2 error; bf16 rounding of the output is ~0.4%)."""
    kv_bytes = 2 * b * ctx * HKV * D * dtype.itemsize
    layers = graph_layers(kv_bytes, device)
    storage, tri, _ = backends(b * ctx + PAGE * b, device, dtype, layers=layers)
    pages = shuffled_pages(storage, [ctx] * b, torch.Generator().manual_seed(ctx))
    seqs = [SeqSlice(p, ctx - 1, 1) for p in pages]
    q = torch.randn(b, H, D, device=device, dtype=dtype)
    static = tri.static_decode_meta(b, len(pages[0]))
    tol = 1e-2 if dtype.itemsize == 2 else 1e-5
    want, rows = None, []
    for cfg in configs:
        with decode_config(cfg):
            meta = tri.load_decode_meta(static, seqs, b)  # the split count of this configuration

            def step(meta=meta) -> None:
                for layer in range(layers):
                    tri.forward(layer, q, None, None, meta, kv_stored=True)

            got = tri.forward(0, q, None, None, meta, kv_stored=True).float()
            if want is None:  # the default: the reference output, and a first timing that only warms the GPU up
                want = got
                bench(step, graph=device.type == "cuda", rep=SWEEP_REP_MS)
            err = ((got - want).norm() / want.norm()).item()
            ms = bench(step, graph=device.type == "cuda", rep=SWEEP_REP_MS) / layers
        rows.append({"config": cfg, "splits": meta.num_splits, "ms": ms, "rel_err": err, "same": err <= tol})
    return {"case": f"decode B={b} ctx={ctx}", "layers": layers, "kv_bytes": kv_bytes, "rows": rows}


def best_config(cases: list[dict]) -> tuple[dict[str, int], float]:
    """The configuration with the least geometric mean of (its ms / the default's ms) over the cases, among
    those whose output matched in every case; and that mean."""
    score = {}
    for i in range(len(cases[0]["rows"])):
        ratios = [c["rows"][i]["ms"] / c["rows"][0]["ms"] if c["rows"][i]["same"] else math.inf for c in cases]
        score[i] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    i = min(score, key=score.get)
    return cases[0]["rows"][i]["config"], score[i]


def sweep_report(cases: list[dict], bw: float) -> list[str]:
    cols = ["launch config", "splits", "ms a layer", "GB/s", "of copy bandwidth", "vs default", "rel err"]
    lines = []
    for c in cases:
        default = c["rows"][0]
        ranked = sorted(c["rows"][1:], key=lambda r: r["ms"] if r["same"] else math.inf)
        shown = [default] + ranked[:TOP] + [r for r in ranked[TOP:] if not r["same"]]
        lines += ["", f"{c['case']}: {c['layers']} layers a graph, K/V {c['kv_bytes'] / 2**20:.1f} MiB a layer, "
                  f"limit {c['kv_bytes'] / bw * 1e3:.4f} ms", "", "| " + " | ".join(cols) + " |", "|" + "---|" * 7]
        for r in shown:
            gbs = c["kv_bytes"] / r["ms"] / 1e6
            cells = [("default " if r is default else "") + json.dumps(r["config"]), r["splits"], f"{r['ms']:.4f}",
                     f"{gbs:.0f}", f"{gbs * 1e9 / bw:.0%}", f"{default['ms'] / r['ms']:.2f}x",
                     f"{r['rel_err']:.1e}" + ("" if r["same"] else " DIFFERS")]
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    best, mean = best_config(cases)
    lines += ["", f"Best over all cases (geometric mean {mean:.3f} of the default's time): "
              f"MIXQUANT_KERNEL_CONFIGS='{json.dumps({'decode_attention': best})}'"]
    return lines


def sweep(smoke: bool, device: torch.device, dtype: torch.dtype) -> list[dict]:
    configs = [dict(DEFAULTS["decode_attention"])] + (SMOKE_SWEEP if smoke else SWEEP)
    cases = []
    for b, ctx in SMOKE_SWEEP_DECODE if smoke else SWEEP_DECODE:
        cases.append(sweep_case(b, ctx, device, dtype, configs))
        print(f"[attention_kernels] sweep of decode B={b} ctx={ctx} done", flush=True)
    return cases


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return f"{gpu}; torch {torch.__version__}; triton {triton.__version__}; cuda {torch.version.cuda}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="also write attention_kernels.{json,md} here")
    launch_defaults = config("decode_attention")
    ap.add_argument("--block-n", type=int, default=launch_defaults["block_n"])
    ap.add_argument("--num-warps", type=int, default=launch_defaults["num_warps"])
    ap.add_argument("--num-stages", type=int, default=launch_defaults["num_stages"])
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time the decode kernel's launch configurations instead")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    launch = dict(block_n=args.block_n, num_warps=args.num_warps, num_stages=args.num_stages)
    bw = copy_bandwidth(device)
    torch.manual_seed(0)
    if args.sweep:
        return write_sweep(args.out, sweep(args.smoke, device, dtype), bw, device)
    rows = [decode_row(b, c, device, dtype, launch) for b, c in (SMOKE_DECODE if args.smoke else DECODE)]
    for r in rows:
        r["limit_ms"] = r.pop("kv_bytes") / bw * 1e3
    rows += [extend_row(b, p, n, device, dtype, args.peak_tflops) for b, p, n in
             (SMOKE_EXTEND if args.smoke else EXTEND)]
    cols = ["case", "splits", "triton_graph_ms", "kernel_ms", "kernel_1split_ms", "triton_ms", "sdpa_ms",
            "torch_ref_ms", "limit_ms"]
    lines = [f"{machine(device)}; launch {launch}; copy bandwidth {bw / 1e12:.2f} TB/s", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        lines.append("| " + " | ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in cells) + " |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_kernels.md").write_text("\n".join(lines) + "\n")
        (args.out / "attention_kernels.json").write_text(json.dumps({"machine": machine(device), "rows": rows}))


def write_sweep(out: Path | None, cases: list[dict], bw: float, device: torch.device) -> None:
    lines = [f"{machine(device)}; copy bandwidth {bw / 1e12:.2f} TB/s"] + sweep_report(cases, bw)
    print("\n".join(lines))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention_sweep.md").write_text("\n".join(lines) + "\n")
        (out / "attention_sweep.json").write_text(json.dumps({"machine": machine(device), "copy_bps": bw,
                                                               "cases": cases}))


if __name__ == "__main__":
    main()
