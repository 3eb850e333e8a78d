"""Serving speed on one GPU: `mixquant-serve launch --mode colocated --workers 1` driven over HTTP with streaming
`/v1/completions` at several concurrencies, against the offline Engine on the same prompts in the same run.

    python benchmarks/serve_speed.py [--concurrency 1,16,64] [--prompt-len 2048] [--output-len 256]
                                     [--prefill-precision nvfp4] [--waves 1] [--no-offline]
                                     [--out DIR] [--record] [--engine-arg KEY=VALUE ...]

Model: Qwen3-8B's shapes (vocab 49152), random bf16 weights (see _gpu_common.py); prefill in
--prefill-precision, decode bf16. Per concurrency C: C * --waves requests, each a fresh random prompt of
--prompt-len token ids, --output-len tokens (ignore_eos, temperature 0), sent by C concurrent clients (httpx,
one request at a time each), streaming with usage. Per request: TTFT (send to first streamed chunk), the gaps
between streamed chunks (ITL; a chunk normally holds one token: chunks whose tokens decode to no text are not
sent, so a gap can span two tokens), TPOT = (last chunk - first chunk) / (tokens - 1). Output tokens/s = all
output tokens / (first send to last end). Before the server starts, the offline Engine with the same
EngineConfig runs the same prompts (waves one after the other, C prompts per `generate`) for the same output
length, and C other fresh prompts for one token: offline step = (T(output) - T(1)) / (output - 1); before
them, untimed, C more prompts warm the level's batch shapes (first-use Triton compilation). The served
figures over the offline ones are the serving overhead (router, HTTP, worker loop, detokenization).
The server is started once, warmed up with one request, and stopped at the end (its log: serve_launch.log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _gpu_common as common  # noqa: E402
from prefill_speed import csv_ints  # noqa: E402

SECTION = "## Serving speed on one GPU (benchmarks/serve_speed.py)"
INTRO = ("`mixquant-serve launch --mode colocated --workers 1` on one GPU, streaming `/v1/completions` (prompts "
         "as random token ids, ignore_eos) at several concurrencies: TTFT, inter-chunk latency (ITL), time per "
         "output token, output tokens/s; beside them the offline Engine (same EngineConfig, same prompts, same "
         "run, before the server starts) and the ratios, i.e. what the router, HTTP and the worker loop cost.")
TAG = "serve"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--concurrency", type=csv_ints, default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--waves", type=int, default=1, help="requests per level = waves * concurrency")
    p.add_argument("--prefill-precision", default="nvfp4")
    p.add_argument("--no-offline", action="store_true", help="skip the offline Engine comparison")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    return p.parse_args(argv)


def engine_config(path: str, args: argparse.Namespace):
    """One EngineConfig for the offline Engine and (as launch flags) the served worker."""
    cfg = common.engine_config(path, args.device, common.parse_engine_args(args.engine_arg),
                               prefill_precision=args.prefill_precision, decode_precision="bf16",
                               max_running_requests=max(args.concurrency),
                               context_length=args.prompt_len + args.output_len + 16)
    if cfg.extra:
        raise SystemExit(f"--engine-arg {sorted(cfg.extra)}: not EngineConfig fields, so `launch` has no flag "
                         "for them")
    return cfg


def launch_argv(cfg) -> list[str]:
    from mixquant_serve.cli_args import engine_args_to_argv

    return ["--mode", "colocated", "--workers", "1", *engine_args_to_argv(cfg)]


def level_prompts(make, args: argparse.Namespace) -> dict[int, list[list[int]]]:
    """Fresh prompts per concurrency level (no level hits a prefix another one cached)."""
    return {c: make(c * args.waves, args.prompt_len, 7919 * (i + 1)) for i, c in enumerate(args.concurrency)}


# -- offline ---------------------------------------------------------------------------------------------


def offline(cfg, prompts: dict[int, list[list[int]]], make, args: argparse.Namespace, out: dict[int, dict]) -> None:
    from mixquant_serve import Engine, SamplingParams

    engine = Engine(config=cfg)

    def gen(batch: list[list[int]], n: int) -> None:
        outs = engine.generate(batch, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        if bad := [o for o in outs if o.error or len(o.token_ids) != n]:
            raise RuntimeError(f"offline engine run failed: {bad[0].error or len(bad[0].token_ids)}")

    gen(make(1, args.prompt_len, 1), 8)  # warm-up
    for c, ps in prompts.items():
        out[c] = offline_level(gen, ps, c, make, args)


def offline_level(gen, ps: list[list[int]], c: int, make, args: argparse.Namespace) -> dict:
    # untimed: this level's batch shapes (mixed chunks, extend kernels) compile their Triton kernels here,
    # not inside the timed runs (the served runs, later and in another process, find them in Triton's cache)
    gen(make(c, args.prompt_len, 31 * c + 6), 8)
    one, _ = common.timed(lambda: gen(make(c, args.prompt_len, 31 * c + 5), 1), args.device)
    full = sum(common.timed(lambda w=w: gen(ps[w * c:(w + 1) * c], args.output_len), args.device)[0]
               for w in range(args.waves))
    row = {"s_first_token": one, "s_full": full, "tokens_per_s": len(ps) * args.output_len / full,
           "step_ms": (full / args.waves - one) / (args.output_len - 1) * 1e3}
    common.log(TAG, f"offline concurrency {c}: {row['tokens_per_s']:.0f} tok/s, step {row['step_ms']:.2f} ms")
    return row


# -- served ----------------------------------------------------------------------------------------------


async def one_request(client, url: str, model: str, ids: list[int], output_len: int) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, chunks, tokens = time.perf_counter(), [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj['error']}")
            if obj.get("choices"):
                chunks.append(time.perf_counter())
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    if not chunks or tokens is None:
        raise RuntimeError("the stream ended without output or usage")
    return {"start": start, "chunks": chunks, "end": time.perf_counter(), "tokens": tokens}


async def drive(url: str, model: str, prompts: list[list[int]], concurrency: int, output_len: int) -> list[dict]:
    """`concurrency` clients, each sending the next waiting prompt when its last request ends."""
    import httpx

    queue, results = list(prompts), []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def client_loop() -> None:
            while queue:
                results.append(await one_request(client, url, model, queue.pop(0), output_len))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


def summarize(results: list[dict]) -> dict:
    ttft = [(r["chunks"][0] - r["start"]) * 1e3 for r in results]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    tpot = [(r["chunks"][-1] - r["chunks"][0]) * 1e3 / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    out = {"requests": len(results), "output_tokens": sum(r["tokens"] for r in results), "seconds": span,
           "tokens_per_s": sum(r["tokens"] for r in results) / span}
    for name, xs in (("ttft", ttft), ("itl", itl), ("tpot", tpot)):
        if xs:
            out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = common.percentile(xs, 50), common.percentile(xs, 99)
    return out


def served(cfg, prompts: dict[int, list[list[int]]], make, args: argparse.Namespace, out: dict[int, dict]) -> None:
    import httpx

    from mixquant_serve.launcher import launched_subprocess

    log_path = Path(args.out, "serve_launch.log") if args.out else None
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    common.log(TAG, f"launch {' '.join(launch_argv(cfg))}")
    start = time.perf_counter()
    with launched_subprocess(launch_argv(cfg), log_path, args.startup_timeout) as url:
        common.log(TAG, f"server ready at {url} in {time.perf_counter() - start:.1f} s")
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(drive(url, model, make(1, args.prompt_len, 2), 1, 8))  # warm-up
        for c, ps in prompts.items():
            out[c] = summarize(asyncio.run(drive(url, model, ps, c, args.output_len)))
            common.log(TAG, f"served concurrency {c}: " + ", ".join(
                f"{k} {v:.1f}" for k, v in out[c].items() if k.endswith(("_ms", "_per_s"))))


# -- report ----------------------------------------------------------------------------------------------


def derive(run: dict) -> None:
    for r in run["rows"]:
        s, o = r.get("served") or {}, r.get("offline") or {}
        r["served_vs_offline_tput"] = s["tokens_per_s"] / o["tokens_per_s"] if s and o else None
        r["tpot_vs_offline_step"] = s["tpot_p50_ms"] / o["step_ms"] if s.get("tpot_p50_ms") and o else None


def render(rows: list[dict]) -> str:
    headers = ["concurrency", "requests", "TTFT p50 / p99 ms", "ITL p50 / p99 ms", "TPOT p50 ms",
               "served output tok/s", "offline tok/s", "served / offline tok/s", "offline step ms",
               "TPOT p50 / offline step"]
    f = common.fmt
    body = []
    for r in rows:
        s, o = r.get("served") or {}, r.get("offline") or {}
        body.append([r["concurrency"], s.get("requests", "-"),
                     f"{f(s.get('ttft_p50_ms'), 1)} / {f(s.get('ttft_p99_ms'), 1)}",
                     f"{f(s.get('itl_p50_ms'))} / {f(s.get('itl_p99_ms'))}", f(s.get("tpot_p50_ms")),
                     f(s.get("tokens_per_s"), 0), f(o.get("tokens_per_s"), 0), f(r["served_vs_offline_tput"]),
                     f(o.get("step_ms")), f(r["tpot_vs_offline_step"])])
    return common.md_table(headers, body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    def series(key: str, part: str) -> list:
        return [(r["concurrency"], r[part][key]) for r in rows if (r.get(part) or {}).get(key) is not None]

    common.plot(path, title, [
        {"title": "time to first token", "xlabel": "concurrency", "ylabel": "ms", "logx": True,
         "series": {"p50": series("ttft_p50_ms", "served"), "p99": series("ttft_p99_ms", "served")}},
        {"title": "inter-token latency", "xlabel": "concurrency", "ylabel": "ms", "logx": True,
         "series": {"ITL p50": series("itl_p50_ms", "served"), "ITL p99": series("itl_p99_ms", "served"),
                    "TPOT p50": series("tpot_p50_ms", "served"), "offline step": series("step_ms", "offline")}},
        {"title": "output throughput", "xlabel": "concurrency", "ylabel": "tokens/s", "logx": True,
         "series": {"served": series("tokens_per_s", "served"), "offline": series("tokens_per_s", "offline")}}])


def measure(run: dict, path: str, args: argparse.Namespace) -> None:
    cfg = engine_config(path, args)
    make = common.prompt_maker(path)
    prompts = level_prompts(make, args)
    run["rows"] = [{"concurrency": c} for c in args.concurrency]
    for part, fn in (("offline", offline), ("served", served)):
        if part == "offline" and args.no_offline:
            continue
        results: dict[int, dict] = {}
        try:
            fn(cfg, prompts, make, args, results)
        except Exception as e:  # the other part can still run
            common.log(TAG, f"{part} FAILED: {type(e).__name__}: {e}")
            run.setdefault("errors", {})[part] = f"{type(e).__name__}: {e}"[:500]
            common.free_memory()
        finally:  # what was measured stays, also when the time limit stops the run
            for row in run["rows"]:
                row[part] = results.get(row["concurrency"])
        common.free_memory()  # the offline engine went out of scope: the server needs the GPU


def report(run: dict, args: argparse.Namespace) -> bool:
    derive(run)
    errors = "".join(f"\n\n{part} failed: {e}" for part, e in run.get("errors", {}).items())
    table = (f"{common.Shape(**run['model']).describe()}, random bf16 weights; prefill {run['prefill_precision']}, "
             f"decode bf16; prompts {run['prompt_len']} tokens, {run['output_len']} output tokens, {run['waves']} "
             f"wave(s) of requests per level{common.engine_args_note(run)}.{errors}\n\n" + render(run["rows"]))
    common.write_outputs(run, table, "serve_speed", args, SECTION, INTRO)
    if args.out:
        plot(run["rows"], Path(args.out, "serve_speed.png"), common.env_line(run)[:110])
    return any(r.get("served") for r in run["rows"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.output_len < 2:
        raise SystemExit("--output-len must be at least 2")
    fields = {"prompt_len": args.prompt_len, "output_len": args.output_len, "waves": args.waves,
              "prefill_precision": args.prefill_precision}
    common.run_benchmark(args, fields, measure, report)


if __name__ == "__main__":
    main()
