"""Decode speed on one GPU: the Engine's bf16 decode step per batch size and context length, against the
memory-bandwidth bound measured in the same run and against Hugging Face transformers with a static KV cache
and its compiled forward.

    python benchmarks/decode_speed.py [--batches 1,8,64,256] [--contexts 1024,8192] [--long-context 32768]
                                      [--steps 32] [--repeats 2] [--no-hf] [--hf-max-batch 64]
                                      [--out DIR] [--record] [--engine-arg KEY=VALUE ...]

Model: Qwen3-8B's shapes (vocab 49152), random bf16 weights (see _gpu_common.py). Per cell (batch B, context C):
B distinct random prompts of C tokens are run once with max_tokens=1 so that the prefix cache holds them, once
more with 1+N new tokens (warm-up); then, --repeats times each, the time T1 of max_tokens=1 and T1+N of
max_tokens=1+N (ignore_eos). Both runs recompute the same uncached tail of each prompt, so the decode step is
(median T1+N - median T1) / N. Cells whose KV does not fit in the engine's cache are skipped (marked).
Bound: the bf16 weights of the linears and the lm_head plus the KV of B sequences at the mean context of the
timed steps, read once per step at the device-to-device copy bandwidth of this run (bytes read + written);
"of bound" = bound time / step time. HF: `generate(cache_implementation="static")` (compiled on first use),
the same difference of two generation lengths on the same prompts, for cells with B <= --hf-max-batch and
B*C <= --hf-max-tokens, while --hf-budget-s lasts (each new shape compiles again).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _gpu_common as common  # noqa: E402
from prefill_speed import csv_ints  # noqa: E402

SECTION = "## Decode speed on one GPU (benchmarks/decode_speed.py)"
INTRO = ("bf16 decode step of the Engine on prompts already in its prefix cache ((time of 1+N new tokens - time of "
         "1) / N), per batch and context, against the memory-bandwidth bound (bf16 weights + KV read once per step "
         "at the device-to-device copy bandwidth measured in the same run) and against HF transformers "
         "`generate(cache_implementation=\"static\")` with its compiled forward, measured the same way in the same "
         "run, on the same random Qwen3-8B-shaped weights (vocab 49152).")
TAG = "decode"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batches", type=csv_ints, default=[1, 8, 64, 256])
    p.add_argument("--contexts", type=csv_ints, default=[1024, 8192], help="prompt lengths of the grid")
    p.add_argument("--long-context", type=int, default=32768, help="one more cell at batch 1 (0: none)")
    p.add_argument("--steps", type=int, default=32, help="N: decode steps in the difference")
    p.add_argument("--repeats", type=int, default=2, help="timed pairs of runs per cell (medians)")
    p.add_argument("--prefill-precision", default="bf16", help="of the runs that fill the cache")
    p.add_argument("--chunk", type=int, default=0,
                   help="chunked_prefill_size of the engine (default: the longest prompt, which is then one chunk)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--hf-max-batch", type=int, default=64)
    p.add_argument("--hf-max-tokens", type=int, default=131072, help="largest batch*context HF runs")
    p.add_argument("--hf-budget-s", type=float, default=240.0, help="no new HF cell after this many seconds")
    p.add_argument("--hf-cells", type=hf_cells, default=None, metavar="BxC,...",
                   help="HF only on these cells, in this order (e.g. 1x1024,64x1024; default: the grid's order)")
    return p.parse_args(argv)


def hf_cells(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(b), int(c)) for b, c in (cell.split("x") for cell in text.split(",") if cell)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want BATCHxCONTEXT,... got {text!r}") from None


def cells(args: argparse.Namespace) -> list[tuple[int, int]]:
    grid = [(b, c) for c in args.contexts for b in args.batches]
    if args.long_context and (1, args.long_context) not in grid:
        grid.append((1, args.long_context))
    return grid


def step_ms(gen, steps: int, repeats: int, device: str) -> float:
    """(median time of 1+steps new tokens - median time of 1) / steps, in ms; gen(n) generates n tokens."""
    longs, shorts = [], []
    for _ in range(repeats):
        shorts.append(common.timed(lambda: gen(1), device)[0])
        longs.append(common.timed(lambda: gen(1 + steps), device)[0])
    long, short = statistics.median(longs), statistics.median(shorts)
    if long <= short:
        raise RuntimeError(f"timing noise: {1 + steps} tokens took {long:.4f} s, 1 token {short:.4f} s")
    return (long - short) / steps * 1e3


def engine_gen(engine, prompts: list[list[int]]):
    from mixquant_serve import SamplingParams

    def gen(n: int) -> list:
        outs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        if bad := [o for o in outs if o.error or len(o.token_ids) != n]:
            raise RuntimeError(f"engine run failed: {bad[0].error or len(bad[0].token_ids)}")
        return outs

    return gen


def engine_cell(engine, make, batch: int, ctx: int, args: argparse.Namespace) -> dict:
    page = engine.config.page_size
    need, pool = batch * -(-(ctx + args.steps + 1) // page), engine.pool.capacity
    if need > pool:
        return {"skipped": f"KV does not fit ({need * page} tokens, cache {pool * page})"}
    gen = engine_gen(engine, make(batch, ctx, batch * 100003 + ctx))
    gen(1)  # now in the prefix cache
    cached = min(o.cached_tokens for o in gen(1 + args.steps))  # and the decode shapes warmed up
    if cached == 0:
        raise RuntimeError("no prefix-cache hit: the decode step would include a whole prefill")
    return {"ms": step_ms(gen, args.steps, args.repeats, args.device), "cached_tokens": cached}


def hf_cell(model, make, batch: int, ctx: int, args: argparse.Namespace) -> dict:
    from transformers import GenerationConfig

    ids = torch.tensor(make(batch, ctx, batch * 100003 + ctx), device=args.device)
    extra = {"max_cache_len": ctx + args.steps + 1} if hasattr(GenerationConfig(), "max_cache_len") else {}

    def gen(n: int) -> None:  # longest first: later, shorter calls reuse its static cache (and compiled graph)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, cache_implementation="static", pad_token_id=0, **extra)
        if out.shape[1] != ctx + n:
            raise RuntimeError(f"HF generated {out.shape[1] - ctx} tokens, not {n}")

    start = time.perf_counter()
    gen(1 + args.steps)
    common.log(TAG, f"HF first generate (compiles) {time.perf_counter() - start:.1f} s")
    gen(1)
    return {"ms": step_ms(gen, args.steps, args.repeats, args.device)}


def measure_cell(kind: str, fn, batch: int, ctx: int) -> dict:
    try:
        row = fn()
    except Exception as e:
        common.log(TAG, f"{kind} batch {batch} context {ctx} FAILED: {type(e).__name__}: {str(e)[:300]}")
        common.free_memory()
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    what = row.get("skipped") or f"{row['ms']:.2f} ms/step, {batch / row['ms'] * 1e3:.0f} tok/s"
    common.log(TAG, f"{kind} batch {batch} context {ctx}: {what}")
    return row


def engine_rows(path: str, make, args: argparse.Namespace, run: dict) -> None:
    grid = cells(args)
    engine = common.make_engine(path, args.device, common.parse_engine_args(args.engine_arg),
                                prefill_precision=args.prefill_precision, decode_precision="bf16",
                                max_running_requests=max(b for b, _ in grid),
                                chunked_prefill_size=max(args.chunk, max(c for _, c in grid) + 16),
                                context_length=max(c for _, c in grid) + args.steps + 16)
    common.log(TAG, f"engine: {engine.weight_summary()}; KV cache {engine.pool.capacity} pages")
    for b, c in grid:
        row = {"batch": b, "context": c}
        row["engine"] = measure_cell("engine", lambda b=b, c=c: engine_cell(engine, make, b, c, args), b, c)
        run["rows"].append(row)


def hf_rows(path: str, make, args: argparse.Namespace, run: dict) -> None:
    model = common.load_hf(path, args.device)
    model.generation_config.eos_token_id = None  # all new tokens, like ignore_eos
    start = time.perf_counter()
    rows = {(r["batch"], r["context"]): r for r in run["rows"]}
    order = list(rows) if args.hf_cells is None else [cell for cell in args.hf_cells if cell in rows]
    for cell, row in rows.items():
        row["hf"] = {"skipped": "not run (time limit)" if cell in order else "not in --hf-cells"}
    for b, c in order:
        row = rows[(b, c)]
        if b > args.hf_max_batch or b * c > args.hf_max_tokens:
            row["hf"] = {"skipped": "over --hf-max-batch / --hf-max-tokens"}
        elif time.perf_counter() - start > args.hf_budget_s:
            row["hf"] = {"skipped": "HF time budget spent"}
        else:
            row["hf"] = measure_cell("HF", lambda b=b, c=c: hf_cell(model, make, b, c, args), b, c)


def derive(rows: list[dict], shape: common.Shape, copy_tbps: float, steps: int) -> None:
    for r in rows:
        kv = r["batch"] * (r["context"] + (steps + 1) / 2) * shape.kv_bytes_per_token
        r["bytes_per_step"] = shape.decode_weight_bytes + kv
        r["bound_ms"] = r["bytes_per_step"] / (copy_tbps * 1e12) * 1e3
        eng, hf = r["engine"].get("ms"), r.get("hf", {}).get("ms")
        if eng:
            r["engine"]["tokens_per_s"] = r["batch"] / eng * 1e3
            r["engine"]["of_bound"] = r["bound_ms"] / eng
        r["vs_hf"] = hf / eng if eng and hf else None


def cell_text(d: dict) -> str:
    if "ms" in d:
        return common.fmt(d["ms"])
    return d.get("skipped") or f"failed: {d.get('error', 'not run')[:60]}"


def render(rows: list[dict]) -> str:
    headers = ["batch", "context", "engine ms/step", "engine tokens/s", "GB read/step", "bound ms", "of bound",
               "HF static+compiled ms/step", "speed vs HF"]
    body = []
    for r in rows:
        e = r["engine"]
        body.append([r["batch"], r["context"], cell_text(e), common.fmt(e.get("tokens_per_s"), 0),
                     common.fmt(r["bytes_per_step"] / 1e9), common.fmt(r["bound_ms"]),
                     f"{e['of_bound']:.1%}" if e.get("of_bound") else "-", cell_text(r.get("hf", {"skipped": "-"})),
                     common.fmt(r["vs_hf"])])
    return common.md_table(headers, body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    tput: dict[str, list] = {}
    bound: dict[str, list] = {}
    for r in rows:
        for kind in ("engine", "hf"):
            d = r.get(kind, {})
            if d.get("ms"):
                label = f"{'engine' if kind == 'engine' else 'HF static+compiled'}, context {r['context']}"
                tput.setdefault(label, []).append((r["batch"], r["batch"] / d["ms"] * 1e3))
        if r["engine"].get("of_bound"):
            bound.setdefault(f"context {r['context']}", []).append((r["batch"], r["engine"]["of_bound"]))
    common.plot(path, title, [
        {"title": "decode throughput", "xlabel": "batch", "ylabel": "tokens/s", "series": tput, "logx": True},
        {"title": "engine step vs memory-bandwidth bound", "xlabel": "batch", "ylabel": "bound time / step time",
         "series": bound, "logx": True}])


def measure(run: dict, path: str, args: argparse.Namespace) -> None:
    make = common.prompt_maker(path)
    engine_rows(path, make, args, run)
    common.free_memory()  # the engine went out of scope with engine_rows
    if not args.no_hf:
        hf_rows(path, make, args, run)
        torch._dynamo.reset()  # compiled graphs hold the model's weights
        common.free_memory()


def report(run: dict, args: argparse.Namespace) -> bool:
    shape = common.Shape(**run["model"])
    derive(run["rows"], shape, run["limits"]["copy"]["tbps"], run["steps"])
    table = (f"{shape.describe()}, random bf16 weights; N = {run['steps']} steps, medians of {run['repeats']} runs "
             f"of each length; prefill {run['prefill_precision']}{common.engine_args_note(run)}.\n\n"
             + render(run["rows"]))
    common.write_outputs(run, table, "decode_speed", args, SECTION, INTRO)
    if args.out:
        plot(run["rows"], Path(args.out, "decode_speed.png"), common.env_line(run)[:110])
    return any(r["engine"].get("ms") for r in run["rows"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fields = {"steps": args.steps, "repeats": args.repeats, "prefill_precision": args.prefill_precision}
    common.run_benchmark(args, fields, measure, report)


if __name__ == "__main__":
    main()
