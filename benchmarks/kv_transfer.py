"""KV transfer between two GPUs: the nccl backend end to end against torch.distributed NCCL send/recv of the
same bytes, measured in the same run.

    python benchmarks/kv_transfer.py [--tokens 1024 8192 32768] [--iters 5] [--out DIR] [--no-append]
    python benchmarks/kv_transfer.py --render kv_transfer.json     # append the table of a saved run

Two processes: the sender on cuda:0, the receiver on cuda:1. The KV is a Qwen3-8B layout (36 layers, 8 KV
heads, head_dim 128, bf16, 16 tokens per page) on random pages. Per prompt length it times, on the receiver,
from the moment both processes leave a barrier:
  backend     NcclSender.send for each of the 36 layers (gather pages, ncclSend) and close; NcclReceiver.poll
              until SUCCESS (ncclRecv, scatter into the pages, every event passed)
  one buffer  dist.send / dist.recv of one contiguous buffer of the same size
  per layer   dist.send / dist.recv of 36 contiguous buffers (the backend's message sizes, no gather/scatter)
  overlapped  as in a prefill worker: the sender runs each layer's GEMMs (Qwen3-8B shapes, the prompt's tokens;
              attention left out, so compute is understated) and sends that layer's KV after it; the
              receiver times until SUCCESS. The sender times the same GEMMs without sending ("compute");
              exposed = overlapped - compute is what the transfer adds to time-to-first-token. The sender
              also times its GEMMs while sending ("compute while sending"): the part of the exposed time
              that is compute slowed down by the transfer (its kernels sharing the GPU, or its host work
              delaying the launch of the next layer's GEMMs: the sender's host time to issue all layers
              is reported too).
Median of --iters runs after one warm-up. With --profile, one more back-to-back run of the first prompt
length runs under cProfile on both sides (profile_rank0.txt for the sender, profile_rank1.txt for the
receiver, in --out). GB/s = 10^9 bytes/s. Prints a table, writes kv_transfer.json and
kv_transfer.md to --out (default $OUT when set) and appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixquant_serve.config import KVLayout  # noqa: E402
from mixquant_serve.kvcache.storage import KVStorage  # noqa: E402
from mixquant_serve.protocol.messages import TransferPeer  # noqa: E402
from mixquant_serve.transfer.base import TransferState, create_receiver, create_sender  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## KV transfer between two GPUs (benchmarks/kv_transfer.py)"
LAYOUT = KVLayout(num_layers=36, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16")
# Qwen3-8B's per-layer GEMMs as (in, out): q/k/v, o, gate/up, down
LAYER_GEMMS = [(4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096)]


def barrier(dev: torch.device) -> None:
    flag = torch.ones(1, device=dev)
    dist.all_reduce(flag)
    sync(dev)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def pages_for(tokens: int, num_pages: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_pages, generator=g)[: tokens // LAYOUT.page_size].tolist()


def fingerprint(storage: KVStorage, pages: list[int]) -> list[int]:
    """Position-weighted sums of the first and last layers' K and V over `pages`, in this order."""
    idx = torch.tensor(pages, device=storage.k[0].device)
    out = []
    for cache in (storage.k[0], storage.v[0], storage.k[-1], storage.v[-1]):
        bits = cache.index_select(0, idx).view(torch.int16).flatten().to(torch.int64)
        out.append(int((bits * (torch.arange(bits.numel(), device=bits.device) % 65521 + 1)).sum()))
    return out


class Side:
    """One process's end: the backend (sender or receiver) plus the torch.distributed baseline."""

    def __init__(self, rank: int, store: dist.TCPStore, num_pages: int, dev: torch.device) -> None:
        self.rank, self.store, self.dev = rank, store, dev
        self.storage = KVStorage(LAYOUT, num_pages, self.dev)
        backend = "nccl" if dev.type == "cuda" else "tcp"  # tcp: a CPU dry run of this script
        if rank == 0:
            for cache in self.storage.k + self.storage.v:
                cache.normal_()
            self.sender = create_sender(backend, self.storage, "bench-prefill", 120.0)
            self.peer = TransferPeer(worker_id="bench-decode", backend=backend, kv_layout={},
                                     address=store.get("address").decode(), nccl_device=1)
        else:
            self.receiver = create_receiver(backend, self.storage, "bench-decode", "127.0.0.1", 120.0)
            store.set("address", self.receiver.address)

        self.weights: list[torch.Tensor] = []
        self.out: list[float] = []  # the sender's time to its last GEMM in an overlapped run
        self.issued: list[float] = []  # the sender's host time to issue every layer's work

    def layer_compute(self, x: torch.Tensor) -> None:
        """One decoder layer's GEMMs on `x` [tokens, 4096] (their results are not used)."""
        if not self.weights:
            self.weights = [torch.empty(k, n, dtype=torch.bfloat16, device=self.dev).normal_(0, 0.02)
                            for k, n in LAYER_GEMMS]
        for w in self.weights:
            torch.matmul(x if w.shape[0] == x.shape[1] else x.new_empty(x.shape[0], w.shape[0]), w)

    def compute_only(self, tokens: int) -> float:
        """Sender: the layers' GEMMs alone, timed to their completion."""
        x = torch.empty(tokens, 4096, dtype=torch.bfloat16, device=self.dev).normal_()
        barrier(self.dev)
        start = time.perf_counter()
        for _ in range(LAYOUT.num_layers):
            self.layer_compute(x)
        sync(self.dev)
        elapsed = time.perf_counter() - start
        barrier(self.dev)
        return elapsed

    def backend(self, rid: str, src: list[int], dst: list[int], compute_tokens: int = 0) -> float:
        """Back to back (compute_tokens=0) or each layer's send after that layer's GEMMs."""
        if self.rank == 0:
            x = torch.empty(max(compute_tokens, 1), 4096, dtype=torch.bfloat16, device=self.dev).normal_()
            self.sender.open(rid, self.peer)
            barrier(self.dev)
            start = time.perf_counter()
            for layer in range(LAYOUT.num_layers):
                if compute_tokens:
                    self.layer_compute(x)
                    if layer == LAYOUT.num_layers - 1:
                        computed = threading.Event()  # set by a thread once the last GEMM has completed
                        mark = torch.cuda.Event() if self.dev.type == "cuda" else None
                        if mark is not None:
                            mark.record()
                        threading.Thread(target=_wait_then_set, args=(mark, computed, start, self.out)).start()
                self.sender.send(rid, layer, src, dst)
            self.issued.append(time.perf_counter() - start)
            self.sender.close(rid)
            while getattr(self.sender, "in_flight", 0):
                self.sender.poll()
            barrier(self.dev)
            self.sender.acknowledge(rid, True, None)
            if compute_tokens:
                computed.wait()
            return self.out.pop() if compute_tokens else 0.0
        self.receiver.expect(rid, dst, "bench-prefill")
        barrier(self.dev)
        start, ended = time.perf_counter(), []
        while not ended:
            ended = self.receiver.poll()
        elapsed = time.perf_counter() - start
        barrier(self.dev)
        if ended[0].state is not TransferState.SUCCESS:
            raise RuntimeError(f"transfer {rid} failed: {ended[0].error}")
        return elapsed

    def torch_p2p(self, bufs: list[torch.Tensor]) -> float:
        barrier(self.dev)
        start = time.perf_counter()
        for buf in bufs:
            dist.send(buf, 1) if self.rank == 0 else dist.recv(buf, 0)
        sync(self.dev)
        elapsed = time.perf_counter() - start
        barrier(self.dev)
        return elapsed


def _wait_then_set(mark: torch.cuda.Event | None, done: threading.Event, start: float, out: list[float]) -> None:
    if mark is not None:
        mark.synchronize()
    out.append(time.perf_counter() - start)
    done.set()


def measure(side: Side, tokens: int, iters: int, profile_dir: str | None = None) -> dict | None:
    """The receiver's row for one prompt length (None on the sender)."""
    src, dst = pages_for(tokens, side.storage.num_pages, 1), pages_for(tokens, side.storage.num_pages, 2)
    nbytes = len(dst) * KVStorage.bytes_per_page(LAYOUT)
    ours = [side.backend(f"{tokens}-{i}", src, dst) for i in range(iters + 1)][1:]
    if profile_dir:
        profiled(side, f"{tokens}-profile", src, dst, Path(profile_dir, f"profile_rank{side.rank}.txt"))
    compute = [side.compute_only(tokens) for _ in range(iters + 1)][1:]
    side.issued.clear()
    overlapped = [side.backend(f"{tokens}-o{i}", src, dst, tokens) for i in range(iters + 1)][1:]
    issued = side.issued[1:]
    buf = torch.empty(nbytes, dtype=torch.uint8, device=side.dev)
    one = [side.torch_p2p([buf]) for _ in range(iters + 1)][1:]
    layers = list(buf.view(LAYOUT.num_layers, -1))
    per_layer = [side.torch_p2p(layers) for _ in range(iters + 1)][1:]
    del buf, layers
    key = f"fingerprint-{tokens}"
    if side.rank == 0:
        side.store.set(key, json.dumps(fingerprint(side.storage, src)))
        side.store.set(f"compute-{tokens}", json.dumps([compute, overlapped, issued]))
        return None
    compute, computing, issued = json.loads(side.store.get(f"compute-{tokens}"))
    verified = json.loads(side.store.get(key)) == fingerprint(side.storage, dst)
    times = {"backend": ours, "one": one, "layer": per_layer, "compute": compute, "computing": computing,
             "issued": issued, "overlapped": overlapped}
    med = {name: statistics.median(xs) for name, xs in times.items()}
    return {"tokens": tokens, "bytes": nbytes, "verified": verified,
            "exposed_ms": (med["overlapped"] - med["compute"]) * 1e3,
            **{f"{k}_ms": v * 1e3 for k, v in med.items()},
            **{f"{k}_gbps": nbytes / v / 1e9 for k, v in med.items()}}


def profiled(side: Side, rid: str, src: list[int], dst: list[int], path: Path) -> None:
    """One back-to-back transfer under cProfile; the 30 functions with the most own time go to `path`."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    side.backend(rid, src, dst)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())


def worker(rank: int, args: argparse.Namespace, result_path: str) -> None:
    cuda = args.device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", args.port, 2, rank == 0)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=2,
                            device_id=dev if cuda else None)
    side = Side(rank, store, max(args.tokens) // LAYOUT.page_size + 64, dev)
    rows = [measure(side, tokens, args.iters, args.out if args.profile and i == 0 else None)
            for i, tokens in enumerate(args.tokens)]
    if rank == 1:
        Path(result_path).write_text(json.dumps(rows))
    barrier(side.dev)
    (side.sender if rank == 0 else side.receiver).shutdown()
    dist.destroy_process_group()


def gpu_link() -> str:
    """The GPU0-GPU1 cell of `nvidia-smi topo -m` (e.g. NV18), or '' when unavailable."""
    try:
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return topo_cell(out)


def topo_cell(topo: str, a: str = "GPU0", b: str = "GPU1") -> str:
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).split() for line in topo.splitlines() if line.strip()]
    header = next((cols for cols in lines if cols[:2] == ["GPU0", "GPU1"]), None)
    row = next((cols for cols in lines if cols[0] == a and cols is not header), None)
    if header is None or row is None or b not in header or len(row) <= header.index(b) + 1:
        return ""
    return row[header.index(b) + 1]


def environment(device: str) -> dict:
    if device != "cuda":
        return {"date": date.today().isoformat(), "gpus": ["cpu (tcp backend, gloo)"] * 2, "link": "",
                "torch": torch.__version__, "cuda": None, "nccl": "-"}
    from mixquant_serve.transfer import nccl_lib

    v = nccl_lib.load().version()
    return {"date": date.today().isoformat(), "gpus": [torch.cuda.get_device_name(i) for i in range(2)],
            "link": gpu_link(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": f"{v // 10000}.{v // 100 % 100}.{v % 100}"}


def render(run: dict) -> str:
    link = f", GPU0-GPU1 link {run['link']} (nvidia-smi topo -m)" if run["link"] else ""
    gpus = " + ".join(run["gpus"]) + link
    lines = [f"{run['date']}: {gpus}; torch {run['torch']}, CUDA {run['cuda']}, NCCL {run['nccl']}; "
             f"Qwen3-8B KV layout, median of {run['iters']} runs, GB/s = 10^9 bytes/s.", "",
             f"| prompt tokens | KV bytes | {run.get('backend', 'nccl')} backend GB/s (ms) "
             "| torch one buffer GB/s (ms) "
             "| torch one send per layer GB/s (ms) | backend / one buffer | data verified |",
             "|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
        cells = [str(r["tokens"]), f"{r['bytes'] / 2**20:.0f} MiB"]
        cells += [f"{r[k + '_gbps']:.1f} ({r[k + '_ms']:.2f})" for k in ("backend", "one", "layer")]
        cells += [f"{r['backend_gbps'] / r['one_gbps']:.2f}", "yes" if r["verified"] else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    if all("compute_ms" in r for r in run["rows"]):
        lines += ["", "Overlapped with compute (each layer's KV sent after that layer's GEMMs, as in a prefill "
                  "worker; attention not computed):", "",
                  "| prompt tokens | compute alone (ms) | sender's host time to issue all layers (ms) "
                  "| compute while sending (ms) | compute + transfer, until received (ms) | exposed transfer (ms) "
                  "| back-to-back transfer (ms) |", "|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            issued, during = (f"{r[k]:.2f}" if k in r else "-" for k in ("issued_ms", "computing_ms"))
            lines.append(f"| {r['tokens']} | {r['compute_ms']:.2f} | {issued} | {during} | {r['overlapped_ms']:.2f} "
                         f"| {r['exposed_ms']:.2f} | {r['backend_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def append_results(table: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n"
        text += ("The nccl transfer backend end to end (gather the pages, ncclSend per layer, ncclRecv, "
                 "scatter into the pages, layer by layer) against torch.distributed NCCL send/recv of the "
                 "same bytes, measured in the same run; times taken on the receiver.\n")
        RESULTS.write_text(text + "\n" + table)
        return
    head, tail = text.split(SECTION, 1)
    ends = [i for i in (tail.find("\n## "), tail.find("\n<!-- ")) if i >= 0]  # the next section or its marker
    nxt = min(ends, default=-1)
    body, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
    RESULTS.write_text(head + SECTION + body.rstrip("\n") + "\n\n" + table + rest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--profile", action="store_true", help="also profile one back-to-back transfer (see above)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a dry run of this script with the tcp backend and gloo (not a GPU result)")
    p.add_argument("--render", help="a kv_transfer.json of an earlier run: append its table and exit")
    args = p.parse_args()
    if args.render:
        table = render(json.loads(Path(args.render).read_text()))
    else:
        if args.device == "cuda" and torch.cuda.device_count() < 2:
            sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
        args.port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(worker, args=(args, f"{tmp}/rows.json"), nprocs=2, join=True)
            rows = json.loads(Path(f"{tmp}/rows.json").read_text())
        run = {**environment(args.device), "iters": args.iters, "rows": rows,
               "backend": "nccl" if args.device == "cuda" else "tcp"}
        table = render(run)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "kv_transfer.json").write_text(json.dumps(run, indent=1))
            Path(args.out, "kv_transfer.md").write_text(table)
    print(table)
    if not args.no_append:
        append_results(table)


if __name__ == "__main__":
    main()
