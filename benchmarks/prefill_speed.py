"""Prefill speed on one GPU: the Engine's time to the first token of one long prompt, per prefill precision,
against Hugging Face transformers (sdpa, bf16) on the same weights, and against the bf16 GEMM peak measured in
the same run.

    python benchmarks/prefill_speed.py [--lengths 2048,8192,32768] [--precisions bf16,fp8,nvfp4] [--no-hf]
                                       [--repeats 3] [--out DIR] [--record] [--engine-arg KEY=VALUE ...]
                                       [--relative-to SPEC]

A precision may carry engine settings of its own, `PRECISION:KEY=VALUE[:KEY=VALUE...]`, so that one run
compares variants of one precision, e.g. the Mix-Quant levers (issue 12):
    --precisions bf16,nvfp4:bf16_kv_proj=false:bf16_tail_tokens=1,nvfp4 \
    --relative-to nvfp4:bf16_kv_proj=false:bf16_tail_tokens=1
(--relative-to adds a column: each row's time over that variant's time at the same length.)

Model: Qwen3-8B's shapes (vocab cut to 49152) with random bf16 weights, built on the device and saved to a
folder (see _gpu_common.py), loaded by `Engine(prefill_precision=P, decode_precision="bf16")`, one engine per
precision, freed before the next. A run is `Engine.generate([ids], max_tokens=1, temperature=0)` on a fresh
random prompt (prefix caching off as well), synchronized, timed with perf_counter: one warm-up, then the median
of --repeats. chunked_prefill_size is at least the longest prompt, so a prompt is one forward. With a quantized
prefill the last prompt token runs as a bf16 decode step (Mix-Quant); that is part of the time, as served.
HF: `model(ids, logits_to_keep=1)` under inference_mode, same warm-up and repeats.
MFU: (2 * linear params * tokens + causal attention 2*L^2*H*D per layer + lm_head for one token) / time,
over the bf16 GEMM peak of this run (also for fp8 and nvfp4, whose own peaks are higher).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _gpu_common as common  # noqa: E402

SECTION = "## Prefill speed on one GPU (benchmarks/prefill_speed.py)"
INTRO = ("Time to the first token of one prompt (no prefix-cache hit) through `Engine.generate(max_tokens=1)`, "
         "per prefill precision (decode bf16: with a quantized prefill the last prompt token is a bf16 decode "
         "step), against HF transformers (sdpa, bf16, `logits_to_keep=1`) on the same random Qwen3-8B-shaped "
         "weights (vocab 49152), in the same run. MFU is against the bf16 GEMM peak measured in the same run.")
TAG = "prefill"
HF = "hf"


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--lengths", type=csv_ints, default=[2048, 8192, 32768], help="prompt lengths (comma list)")
    p.add_argument("--precisions", default="bf16,fp8,nvfp4", help="prefill precisions (comma list)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell after one warm-up (median)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--chunk", type=int, default=0, help="chunked_prefill_size (default: the longest prompt)")
    p.add_argument("--relative-to", default=None, metavar="SPEC", help="add a column: time over the time of this "
                   "entry of --precisions at the same length")
    return p.parse_args(argv)


class Prompts:
    """A fresh random prompt for every run: no run can hit a cache another one filled."""

    def __init__(self, path: str) -> None:
        self.make = common.prompt_maker(path)
        self.seed = 1000

    def __call__(self, length: int) -> list[int]:
        self.seed += 1
        return self.make(1, length, self.seed)[0]


def parse_spec(spec: str) -> tuple[str, dict]:
    """`PRECISION[:KEY=VALUE...]` -> (precision, engine settings of this variant)."""
    precision, *pairs = spec.split(":")
    return precision, common.parse_engine_args(pairs)


def median_ms(run, prompts: Prompts, length: int, repeats: int, device: str) -> float:
    """One warm-up run, then the median of `repeats` runs, each on a fresh prompt."""
    times = [common.timed(partial(run, prompts(length)), device)[0] for _ in range(repeats + 1)]
    return statistics.median(times[1:]) * 1e3


def engine_cells(path: str, spec: str, args: argparse.Namespace, prompts: Prompts, extra: dict) -> list[dict]:
    from mixquant_serve import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    longest = max(args.lengths)
    precision, own = parse_spec(spec)
    engine = common.make_engine(path, args.device, {**extra, **own}, prefill_precision=precision,
                                decode_precision="bf16", enable_prefix_caching=False, max_running_requests=1,
                                context_length=longest + 16, chunked_prefill_size=max(args.chunk, longest))
    c = engine.config
    common.log(TAG, f"engine {spec}: {engine.weight_summary()}; bf16 tail {c.bf16_tail_tokens}, k/v projections "
                    f"{c.kv_proj_precision or c.prefill_precision}")

    def run(ids: list[int]) -> None:
        out = engine.generate([ids], params)[0]
        if out.error or len(out.token_ids) != 1:
            raise RuntimeError(f"engine run failed: {out.error or out.token_ids}")

    return [cell(spec, n, lambda n=n: median_ms(run, prompts, n, args.repeats, args.device)) for n in args.lengths]


def hf_cells(path: str, args: argparse.Namespace, prompts: Prompts) -> list[dict]:
    model = common.load_hf(path, args.device)

    def run(ids: list[int]) -> None:
        with torch.inference_mode():
            model(torch.tensor([ids], device=args.device), logits_to_keep=1)

    return [cell(HF, n, lambda n=n: median_ms(run, prompts, n, args.repeats, args.device)) for n in args.lengths]


def cell(precision: str, tokens: int, measure) -> dict:
    """One row; a failure (out of memory, an engine error) becomes the row's error and the run goes on."""
    try:
        ms = measure()
    except Exception as e:
        common.log(TAG, f"{precision} {tokens} tokens FAILED: {type(e).__name__}: {str(e)[:300]}")
        common.free_memory()
        return {"precision": precision, "tokens": tokens, "ms": None, "error": f"{type(e).__name__}: {e}"[:300]}
    common.log(TAG, f"{precision} {tokens} tokens: {ms:.2f} ms ({tokens / ms * 1e3:.0f} tok/s)")
    return {"precision": precision, "tokens": tokens, "ms": ms}


def derive(rows: list[dict], shape: common.Shape, peak_tflops: float, relative_to: str | None = None) -> None:
    """tokens/s, MFU and the ratios (bf16 ms / ms, HF ms / ms; with relative_to, ms / its ms), in place."""
    ms_of = {(r["precision"], r["tokens"]): r["ms"] for r in rows}
    for r in rows:
        if r["ms"] is None:
            continue
        r["tokens_per_s"] = r["tokens"] / r["ms"] * 1e3
        r["tflops"] = shape.prefill_flops(r["tokens"]) / (r["ms"] / 1e3) / 1e12
        r["mfu"] = r["tflops"] / peak_tflops
        for key, ref in (("vs_bf16", "bf16"), ("vs_hf", HF)):
            base = ms_of.get((ref, r["tokens"]))
            r[key] = base / r["ms"] if base else None
        if relative_to:
            base = ms_of.get((relative_to, r["tokens"]))
            r["time_vs_ref"] = r["ms"] / base if base else None


def render(rows: list[dict], relative_to: str | None = None) -> str:
    headers = ["prompt tokens", "prefill precision", "ms", "tokens/s", "TFLOP/s", "MFU",
               "speed vs engine bf16", "speed vs HF"] + ([f"time vs {relative_to}"] if relative_to else [])
    body = []
    for r in sorted(rows, key=lambda r: (r["tokens"], r["precision"] != HF)):
        name = "HF transformers (sdpa, bf16)" if r["precision"] == HF else f"engine {r['precision']}"
        if r["ms"] is None:
            body.append([r["tokens"], name, f"failed: {r['error'][:80]}"] + ["-"] * (len(headers) - 3))
            continue
        body.append([r["tokens"], name, common.fmt(r["ms"]), f"{r['tokens_per_s']:.0f}", common.fmt(r["tflops"], 1),
                     f"{r['mfu']:.1%}", common.fmt(r.get("vs_bf16")) if r["precision"] != HF else "-",
                     common.fmt(r.get("vs_hf"))] + ([common.fmt(r.get("time_vs_ref"))] if relative_to else []))
    return common.md_table(headers, body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    series: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r["tokens"]):
        if r["ms"] is not None:
            series.setdefault("HF transformers" if r["precision"] == HF else f"engine {r['precision']}",
                              []).append((r["tokens"], r["tokens_per_s"]))
    common.plot(path, title, [{"title": "prefill throughput", "xlabel": "prompt tokens", "ylabel": "tokens/s",
                               "series": series, "logx": True}])


def measure(run: dict, path: str, args: argparse.Namespace) -> None:
    prompts = Prompts(path)
    extra = common.parse_engine_args(args.engine_arg)
    for spec in [p for p in args.precisions.split(",") if p]:
        common.log(TAG, f"engine, prefill {spec}")
        try:
            run["rows"] += engine_cells(path, spec, args, prompts, extra)
        except Exception as e:  # the engine did not build (e.g. a precision this GPU cannot run)
            common.log(TAG, f"engine {spec} FAILED to build: {type(e).__name__}: {e}")
            run["rows"] += [{"precision": spec, "tokens": n, "ms": None, "error": f"build: {e}"[:300]}
                            for n in args.lengths]
        common.free_memory()  # the engine went out of scope with engine_cells
    if not args.no_hf:
        common.log(TAG, "HF transformers")
        run["rows"] += hf_cells(path, args, prompts)
        common.free_memory()


def report(run: dict, args: argparse.Namespace) -> bool:
    shape = common.Shape(**run["model"])
    relative_to = run.get("relative_to")
    derive(run["rows"], shape, run["limits"]["peak"]["tflops"], relative_to)
    table = (f"{shape.describe()}, random bf16 weights; median of {run['repeats']} runs after one "
             f"warm-up{common.engine_args_note(run)}.\n\n" + render(run["rows"], relative_to))
    common.write_outputs(run, table, "prefill_speed", args, SECTION, INTRO)
    if args.out:
        plot(run["rows"], Path(args.out, "prefill_speed.png"), common.env_line(run)[:110])
    return any(r["ms"] for r in run["rows"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.relative_to and args.relative_to not in args.precisions.split(","):
        raise SystemExit(f"--relative-to {args.relative_to!r} is not one of --precisions {args.precisions!r}")
    common.run_benchmark(args, {"repeats": args.repeats, "relative_to": args.relative_to}, measure, report)


if __name__ == "__main__":
    main()
