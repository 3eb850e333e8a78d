"""Where a prefill and a decode step spend their GPU time: torch.profiler's kernel table for the engine.

    python benchmarks/profile_step.py --model-dir /tmp/q8b --prefill-tokens 8192 --precisions bf16,fp8 \
        --decode-batch 1 --decode-context 1024 --out $OUT

Builds (or reuses) the Qwen3-8B-shaped random checkpoint of the speed benchmarks, then for each precision
profiles one prefill of --prefill-tokens tokens and --decode-steps decode steps of a batch already in the
prefix cache. Prints, per phase, the GPU kernels by total time (count, total, share) and the GPU-busy time
against the wall time, so that the gap between kernels (launch and host overhead) shows too. `--gaps N` adds
where the GPU sat idle: before the first kernel, after the last, and the N longest gaps between kernels, each
with the kernels around it and the host ops that started while it lasted (what the GPU waited for);
`--host-profile N` adds cProfile's top N host functions of one more prefill.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gpu_common import add_common_args, free_memory, make_engine, model_folder, parse_engine_args, prompt_maker

from mixquant_serve import SamplingParams


def kernel_table(prof: torch.profiler.profile, wall_ms: float, top: int) -> str:
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = totals[ev.name[:90]]
            t[0] += 1
            t[1] += ev.device_time_total / 1000 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1000
    busy = sum(v[1] for v in totals.values())
    lines = [f"GPU busy {busy:.2f} ms of {wall_ms:.2f} ms wall ({100 * busy / max(wall_ms, 1e-9):.0f}%)",
             f"{'kernel':90s} {'count':>6s} {'ms':>9s} {'share':>6s}"]
    for name, (count, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{name:90s} {count:6d} {ms:9.3f} {100 * ms / max(busy, 1e-9):5.1f}%")
    return "\n".join(lines)


Interval = tuple[float, float, str]  # start, end (microseconds on the profiler's clock), name


def _intervals(prof: torch.profiler.profile) -> tuple[list[Interval], list[Interval]]:
    """(GPU kernels and copies, host ops) of a profile, each sorted by start."""
    gpu, host = [], []
    for ev in prof.events():
        iv = (ev.time_range.start, ev.time_range.end, ev.name)
        (gpu if ev.device_type == torch.autograd.DeviceType.CUDA else host).append(iv)
    return sorted(gpu), sorted(host)


def gap_report(gpu: list[Interval], host: list[Interval], top: int, min_us: float = 5.0) -> str:
    """Where the GPU idles: lead (first host op to first kernel), trail (last kernel to last host op) and the
    `top` longest gaps of at least min_us between kernels, with the host ops that began inside each gap."""
    if not gpu:
        return "no GPU activity"
    gaps, busy_end, prev = [], gpu[0][1], gpu[0][2]
    for start, end, name in gpu[1:]:
        if start - busy_end >= min_us:
            gaps.append((busy_end, start, prev, name))
        if end > busy_end:
            busy_end, prev = end, name
    t0 = min(host[0][0], gpu[0][0]) if host else gpu[0][0]
    t1 = max(max(h[1] for h in host), busy_end) if host else busy_end
    lines = [f"GPU idle: lead {(gpu[0][0] - t0) / 1e3:.2f} ms, trail {(t1 - busy_end) / 1e3:.2f} ms, "
             f"{len(gaps)} gaps >= {min_us:.0f} us between kernels: {sum(b - a for a, b, _, _ in gaps) / 1e3:.2f} ms"]
    pairs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for a, b, before, after in gaps:
        pair = pairs[before[:40], after[:40]]
        pair[0] += 1
        pair[1] += b - a
    for (before, after), (count, us) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {count:5d} x {us / max(count, 1):6.0f} us = {us / 1e3:6.2f} ms: {before} -> {after}")
    lines.append("longest:")
    for a, b, before, after in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        began = sorted((h for h in host if a <= h[0] < b), key=lambda h: h[0] - h[1])[:3]
        ops = ", ".join(f"{n[:40]} {(e - s):.0f} us" for s, e, n in began) or "-"
        lines.append(f"  {(b - a):8.0f} us at {(a - t0) / 1e3:7.2f} ms: {before[:40]} -> {after[:40]} | host: {ops}")
    return "\n".join(lines)


def host_profile(fn, top: int) -> str:
    """cProfile of one call of fn (until the GPU finished it): the `top` functions by cumulative host time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    body = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(body) if "ncalls" in line), 0)
    return "host (cProfile, by cumulative time):\n" + "\n".join(line for line in body[start:] if line.strip())


def profiled(fn) -> tuple[torch.profiler.profile, float]:
    fn()  # warm-up: compilation, graph capture paths, allocator
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000
    return prof, wall


def profile_engine(engine, make_prompts, precision: str, args: argparse.Namespace) -> list[str]:
    """Kernel tables of one fresh prefill and of decode steps over a cached batch."""
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    seeds = iter(range(10**6))
    prof, wall = profiled(lambda: engine.generate(make_prompts(1, args.prefill_tokens, next(seeds)), one))
    out = [f"== prefill {args.prefill_tokens} tokens, {precision}\n{kernel_table(prof, wall, args.top)}"]
    if args.gaps:
        out[-1] += "\n" + gap_report(*_intervals(prof), args.gaps)
    if args.cpu_top:  # where the host's time goes when the GPU waits for it
        out[-1] += "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.cpu_top)
    if args.host_profile:  # Python's view of another such prefill: the host functions the GPU waits for
        out[-1] += "\n" + host_profile(lambda: engine.generate(make_prompts(1, args.prefill_tokens, next(seeds)),
                                                                one), args.host_profile)
    batch = make_prompts(args.decode_batch, args.decode_context, 7)
    engine.generate(batch, one)  # now cached: the profiled run decodes
    steps = SamplingParams(max_tokens=1 + args.decode_steps, temperature=0, ignore_eos=True)
    prof, wall = profiled(lambda: engine.generate(batch, steps))
    out.append(f"== decode batch {args.decode_batch} at {args.decode_context} context, {args.decode_steps} steps "
               f"(+1 prefill of the cached prompt's last token), {precision}\n{kernel_table(prof, wall, args.top)}")
    if args.gaps:
        out[-1] += "\n" + gap_report(*_intervals(prof), args.gaps)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--precisions", default="bf16")
    p.add_argument("--prefill-tokens", type=int, default=8192)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--decode-context", type=int, default=1024)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="also cProfile one more prefill and list its N top host functions (cumulative)")
    p.add_argument("--gaps", type=int, default=0, help="also list the N longest GPU idle gaps and what the host did")
    p.add_argument("--cpu-top", type=int, default=0, help="also list the prefill's N ops by host (self CPU) time")
    args = p.parse_args()
    path, _, tmp = model_folder(args, args.device)
    make_prompts = prompt_maker(path)
    extra = parse_engine_args(args.engine_arg)
    report = []
    for precision in args.precisions.split(","):
        engine = make_engine(path, args.device, extra, prefill_precision=precision, decode_precision="bf16",
                             chunked_prefill_size=max(args.prefill_tokens, 8192), enable_prefix_caching=True)
        report += profile_engine(engine, make_prompts, precision, args)
        print(*report[-2:], sep="\n", flush=True)
        del engine
        free_memory()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "profile_step.txt").write_text("\n\n".join(report) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
