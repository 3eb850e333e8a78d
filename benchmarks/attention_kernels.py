"""Attention backends on one layer of a Llama-3-8B-shaped KV cache: Triton against the PyTorch reference.

    python benchmarks/attention_kernels.py [--out DIR] [--block-n 64 --num-warps 4 --num-stages 2]
    TRITON_INTERPRET=1 python benchmarks/attention_kernels.py --smoke   # tiny shapes on CPU: the script runs

Decode (B rows, each ctx keys; pages shuffled as in a long-running pool): the backend forward (K/V write +
attention) of TritonBackend replayed in a CUDA graph over static metadata, the bare kernel with the
given launch parameters and with one split, and TorchRefBackend's forward (the peer). The limit is the
time to read the K/V bytes at the bandwidth of a same-run device-to-device copy.
Extend (B sequences of `new` tokens after a cached `prefix`): TritonBackend's forward with the Triton
kernel (its default KV splits), the bare kernel with one split, the forward with SDPA where it applies
(one sequence, no prefix), and TorchRefBackend's (the peer); the limit
is the causal FLOPs at the dense BF16 peak given by --peak-tflops (989 for an H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from mixquant_serve.config import KVLayout
from mixquant_serve.kernels.decode_attention import decode_attention
from mixquant_serve.kernels.extend_attention import extend_attention
from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.layers.attention.base import SeqSlice
from mixquant_serve.layers.attention.torch_ref import TorchRefBackend
from mixquant_serve.layers.attention.triton_backend import TritonBackend

H, HKV, D, PAGE = 32, 8, 128, 16
DECODE = [(1, 4096), (8, 4096), (32, 2048), (64, 4096), (128, 1024), (8, 32768)]
EXTEND = [(1, 0, 2048), (1, 0, 8192), (1, 8192, 512), (1, 16384, 64), (8, 4096, 128), (16, 0, 512), (4, 2048, 3)]
SMOKE_DECODE, SMOKE_EXTEND = [(3, 40)], [(1, 0, 20), (2, 16, 5)]


def bench(fn: Callable[[], object], graph: bool = False) -> float:
    """Milliseconds per call (median of triton's do_bench on CUDA; a short wall-clock loop elsewhere)."""
    if not torch.cuda.is_available():
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - start) / 3 * 1e3
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=200)
    return triton.testing.do_bench(fn, warmup=25, rep=200)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a same-run device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench(lambda: dst.copy_(src)) / 1e3)


def backends(tokens: int, device: torch.device, dtype: torch.dtype, **kw: object):
    layout = KVLayout(1, HKV, D, PAGE, str(dtype).removeprefix("torch."))
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


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return f"{gpu}; torch {torch.__version__}; triton {triton.__version__}; cuda {torch.version.cuda}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="also write attention_kernels.{json,md} here")
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    launch = dict(block_n=args.block_n, num_warps=args.num_warps, num_stages=args.num_stages)
    bw = copy_bandwidth(device)
    torch.manual_seed(0)
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


if __name__ == "__main__":
    main()
