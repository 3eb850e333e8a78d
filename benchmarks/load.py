"""Load and soak: a fixed number of clients call the OpenAI API for a duration (or a request count), every
answer is checked, and the cluster's memory and KV pages are sampled while it runs.

    .venv/bin/python benchmarks/load.py --duration 1800 --concurrency 8            # launches 2P+2D tcp
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 --requests 500  # an existing server
    make soak DURATION=1800 CONCURRENCY=8

Each client loops: it picks a request kind (chat, streamed or not; with tools and a named tool_choice;
n=2), and for a `--disconnect-fraction` of them goes away early (closes a stream after a few events, or
gives a JSON request a short timeout). Every answer is verified (load_checks.py) and counted as
  answered      HTTP 200 and well-formed
  failed        an HTTP error or an error event in a stream, by class (status:code), in OpenAI's shape
  malformed     a 200 that fails a check, or an error body not in OpenAI's shape
  lost          no answer at all: connection refused or reset, timeout, a stream cut without [DONE]
  disconnected  the client left on purpose (not an error)
A sampler reads GET /workers every `--sample-every` seconds (free, cached and total KV pages, running and
waiting requests, each worker's pid) and the resident memory (RSS) of the router and every worker through
psutil (same machine only). At the end, once the workers are idle, pages neither free nor held by a prefix
cache are leaked. It prints a table and writes a plot (latency and RSS over time) and a JSON summary.
`--stop-every S` injects faults: every S seconds one worker is SIGSTOPped for `--stop-for` seconds, then
SIGCONTed (a hung, not dead, worker).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_checks import StreamCheck, chat_problems, error_shape  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": {
    "type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]}}}
    for n, d in (("get_weather", "Weather of a city"), ("run_command", "Run a shell command"))]
TOOL_NAMES = {t["function"]["name"] for t in TOOLS}
KINDS = ("chat", "chat_stream", "tools", "tools_stream", "n2", "n2_stream")
WORDS = ("cache", "worker", "token", "decode", "prefill", "page", "batch", "session", "socket", "retry")


@dataclass(frozen=True)
class LoadConfig:
    concurrency: int = 8
    duration: float | None = None  # seconds; or
    requests: int | None = None  # a request count
    max_tokens: int = 16
    max_words: int = 120  # of the user message
    disconnect_fraction: float = 0.1
    sample_every: float = 5.0
    timeout: float = 300.0  # a request with no answer for this long is lost
    model: str | None = None  # default: the server's only model
    seed: int = 0
    stop_every: float = 0.0  # fault injection: SIGSTOP a worker every this many seconds (0: never)
    stop_for: float = 20.0


@dataclass(frozen=True)
class Spec:
    kind: str
    body: dict[str, Any]
    disconnect_after: int | None  # events (stream) before leaving; for JSON, leave after a short timeout


@dataclass
class Outcome:
    kind: str
    result: str  # answered, failed:<status>:<code>, malformed, lost, disconnected
    start: float
    latency: float
    ttft: float | None = None
    problems: list[str] = field(default_factory=list)


def make_spec(rng: random.Random, i: int, cfg: LoadConfig, model: str) -> Spec:
    kind = rng.choice(KINDS)
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, cfg.max_words)))
    body: dict[str, Any] = {
        "model": model, "max_tokens": rng.randint(1, cfg.max_tokens), "temperature": rng.choice([0, 0.7, 1.0]),
        "prompt_cache_key": f"load-session-{rng.randint(0, 15)}", "stream": kind.endswith("_stream"),
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": f"Request {i}. Summarize: {words}"}]}
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    if kind.startswith("tools"):  # a named function: its name is forced, the arguments are the model's
        name = rng.choice(sorted(TOOL_NAMES))
        body.update(tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}})
    if kind.startswith("n2"):
        body["n"] = 2
    leave = rng.random() < cfg.disconnect_fraction
    return Spec(kind, body, rng.randint(1, 4) if leave else None)


async def call(client: httpx.AsyncClient, url: str, spec: Spec, cfg: LoadConfig) -> Outcome:
    start = time.monotonic()
    out = Outcome(spec.kind, "lost", start, 0.0)
    try:
        if spec.body["stream"]:
            await _stream(client, url, spec, out)
        else:
            await _json(client, url, spec, out, cfg)
    except httpx.TimeoutException as e:
        out.result = "disconnected" if spec.disconnect_after is not None and not spec.body["stream"] else "lost"
        out.problems.append(f"timeout: {e!r}")
    except httpx.HTTPError as e:
        out.result, out.problems = "lost", [f"{type(e).__name__}: {e}"]
    out.latency = time.monotonic() - start
    return out


async def _json(client: httpx.AsyncClient, url: str, spec: Spec, out: Outcome, cfg: LoadConfig) -> None:
    timeout = random.uniform(0.05, 1.0) if spec.disconnect_after is not None else cfg.timeout
    r = await client.post(f"{url}/v1/chat/completions", json=spec.body, timeout=timeout)
    body = _decode(r.content)
    if r.status_code != 200:
        _failed(out, r.status_code, body)
        return
    out.problems = chat_problems(body, spec.body.get("n", 1), spec.body["max_tokens"], TOOL_NAMES)
    out.result = "malformed" if out.problems else "answered"


async def _stream(client: httpx.AsyncClient, url: str, spec: Spec, out: Outcome) -> None:
    n = spec.body.get("n", 1)
    check = StreamCheck(n, spec.body["max_tokens"], TOOL_NAMES, want_usage=True)
    async with client.stream("POST", f"{url}/v1/chat/completions", json=spec.body) as r:
        if r.status_code != 200:
            _failed(out, r.status_code, _decode(await r.aread()))
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if out.ttft is None:
                out.ttft = time.monotonic() - out.start
            check.feed(line[6:])
            if spec.disconnect_after is not None and check.events >= spec.disconnect_after and not check.done:
                out.result = "disconnected"
                return
    if check.errors:
        err = check.errors[0]
        _failed(out, 200, err)
        if not check.done:
            out.problems.append("error event without [DONE] after it")
            out.result = "malformed"
        return
    out.problems = check.problems()
    lost = not check.done and not check.bad
    out.result = "lost" if lost else "malformed" if out.problems else "answered"


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw[:200].decode(errors="replace")


def _failed(out: Outcome, status: int, body: Any) -> None:
    shape = error_shape(body)
    code = body["error"].get("code") if not shape else None
    out.result = "malformed" if shape else f"failed:{status}:{code}"
    out.problems = shape or [str(body["error"].get("message"))[:200]]


# ---------------------------------------------------------------- sampling and faults
class Sampler:
    """Every `every` seconds: each worker's KV pages and load from GET /workers, and every process's RSS."""

    def __init__(self, url: str, every: float, router_pid: int | None) -> None:
        self.url, self.every, self.router_pid = url, every, router_pid
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.pids: dict[str, int] = {}

    async def run(self, client: httpx.AsyncClient) -> None:
        while True:
            await self.sample(client)
            await asyncio.sleep(self.every)

    async def sample(self, client: httpx.AsyncClient) -> None:
        row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2), "rss_mb": {}, "workers": {}}
        try:
            workers = (await client.get(f"{self.url}/workers", timeout=10)).json()
        except (httpx.HTTPError, ValueError):
            workers = []
        for w in workers:
            name, stats = w["worker_id"], w.get("stats") or {}
            if w.get("info"):
                self.pids[name] = w["info"]["pid"]
            row["workers"][name] = {k: stats.get(k) for k in ("free_pages", "cached_pages", "total_pages",
                                                                  "num_running", "num_waiting")}
            row["workers"][name]["healthy"] = w["healthy"]
        for name, pid in [("router", self.router_pid), *self.pids.items()]:
            if pid is not None and (rss := _rss_mb(pid)) is not None:
                row["rss_mb"][name] = rss
        self.rows.append(row)


def _rss_mb(pid: int) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except (psutil.Error, OSError):
        return None


async def inject_stops(sampler: Sampler, cfg: LoadConfig, rng: random.Random, log: list[str]) -> None:
    """Every stop_every seconds, SIGSTOP one worker for stop_for seconds (then SIGCONT)."""
    while True:
        await asyncio.sleep(cfg.stop_every)
        if not sampler.pids:
            continue
        name = rng.choice(sorted(sampler.pids))
        pid = sampler.pids[name]
        log.append(f"t={time.monotonic() - sampler.t0:.0f}s SIGSTOP {name} for {cfg.stop_for:.0f}s")
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(cfg.stop_for)
        finally:
            os.kill(pid, signal.SIGCONT)


# ---------------------------------------------------------------- the run
async def run_load(url: str, cfg: LoadConfig, router_pid: int | None = None) -> dict[str, Any]:
    """Drive `url` with cfg; returns the summary (see `summarize`) with every outcome and sample."""
    assert cfg.duration or cfg.requests, "give a duration or a request count"
    limits = httpx.Limits(max_connections=cfg.concurrency + 8, max_keepalive_connections=cfg.concurrency + 8)
    async with httpx.AsyncClient(timeout=cfg.timeout, limits=limits) as client:
        model = cfg.model or (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        sampler, faults = Sampler(url, cfg.sample_every, router_pid), []
        background = [asyncio.create_task(sampler.run(client))]
        if cfg.stop_every:
            background.append(asyncio.create_task(inject_stops(sampler, cfg, random.Random(cfg.seed + 1), faults)))
        outcomes = await _clients(client, url, cfg, model, sampler.t0)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        leaked = await settle(client, url)
        await sampler.sample(client)
    return summarize(cfg, outcomes, sampler, leaked, faults)


async def _clients(client: httpx.AsyncClient, url: str, cfg: LoadConfig, model: str, t0: float) -> list[Outcome]:
    rng, counter, outcomes = random.Random(cfg.seed), iter(range(10**9)), []
    end = t0 + cfg.duration if cfg.duration else None

    async def one_client() -> None:
        while True:
            i = next(counter)
            if (cfg.requests and i >= cfg.requests) or (end and time.monotonic() >= end):
                return
            outcomes.append(await call(client, url, make_spec(rng, i, cfg, model), cfg))

    await asyncio.gather(*[one_client() for _ in range(cfg.concurrency)])
    return outcomes


async def settle(client: httpx.AsyncClient, url: str, timeout: float = 60.0) -> dict[str, int]:
    """Wait until every healthy worker is idle; then the pages each holds neither free nor cached."""
    deadline = time.monotonic() + timeout
    while True:
        workers = [w for w in (await client.get(f"{url}/workers", timeout=10)).json() if w["healthy"]]
        stats = {w["worker_id"]: w["stats"] for w in workers if w.get("stats")}
        leaked = {k: s["total_pages"] - s["free_pages"] - s["cached_pages"] for k, s in stats.items()}
        idle = all(s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats.values())
        if (idle and not any(leaked.values())) or time.monotonic() > deadline:
            return leaked
        await asyncio.sleep(0.5)


def _pct(values: list[float], q: float) -> float | None:
    return round(statistics.quantiles(values, n=100)[q - 1], 3) if len(values) >= 2 else None


def summarize(cfg: LoadConfig, outcomes: list[Outcome], sampler: Sampler, leaked: dict[str, int],
              faults: list[str]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.result] = counts.get(o.result, 0) + 1
    ok = [o.latency for o in outcomes if o.result == "answered"]
    ttft = [o.ttft for o in outcomes if o.result == "answered" and o.ttft is not None]
    elapsed = max((o.start - sampler.t0 + o.latency for o in outcomes), default=0.0)
    rss = _rss_growth(sampler.rows)
    free_min = {}
    for row in sampler.rows:
        for name, w in row["workers"].items():
            if w["free_pages"] is not None:
                free_min[name] = min(free_min.get(name, w["free_pages"]), w["free_pages"])
    return {
        "config": asdict(cfg), "sent": len(outcomes), "counts": counts, "elapsed_s": round(elapsed, 1),
        "answered": counts.get("answered", 0), "lost": counts.get("lost", 0),
        "malformed": counts.get("malformed", 0), "disconnected": counts.get("disconnected", 0),
        "failed": {k[7:]: v for k, v in counts.items() if k.startswith("failed:")},
        "latency_p50_s": _pct(ok, 50), "latency_p99_s": _pct(ok, 99), "ttft_p50_s": _pct(ttft, 50),
        "answered_per_s": round(len(ok) / elapsed, 2) if elapsed else None,
        "leaked_pages": leaked, "min_free_pages": free_min, "rss_mb": rss, "faults": faults,
        "problems": [f"{o.kind} {o.result}: {p}" for o in outcomes if o.result in ("malformed", "lost")
                     for p in o.problems][:50],
        "samples": sampler.rows, "outcomes": [(round(o.start - sampler.t0, 2), round(o.latency, 3), o.result)
                                              for o in outcomes],
    }


def _rss_growth(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per process: RSS at the first sample after warm-up (a tenth of the run), at the end, the peak."""
    out: dict[str, dict[str, float]] = {}
    if not rows:
        return out
    warm_t = rows[-1]["t"] / 10
    for name in {n for r in rows for n in r["rss_mb"]}:
        series = [(r["t"], r["rss_mb"][name]) for r in rows if name in r["rss_mb"]]
        warm = next((v for t, v in series if t >= warm_t), series[0][1])
        out[name] = {"start": series[0][1], "warm": warm, "end": series[-1][1],
                     "peak": max(v for _, v in series), "growth": round(series[-1][1] - warm, 1)}
    return out


# ---------------------------------------------------------------- report
def table(s: dict[str, Any]) -> str:
    cfg = s["config"]
    failed = ", ".join(f"{k} x{v}" for k, v in sorted(s["failed"].items())) or "0"
    rss = "; ".join(f"{n} {r['warm']:.0f}->{r['end']:.0f} MB (peak {r['peak']:.0f})"
                    for n, r in sorted(s["rss_mb"].items()))
    rows = [("requests sent", s["sent"]), ("concurrency", cfg["concurrency"]), ("elapsed", f"{s['elapsed_s']} s"),
            ("answered (verified)", s["answered"]), ("failed (status:code)", failed), ("malformed", s["malformed"]),
            ("lost", s["lost"]), ("disconnected on purpose", s["disconnected"]),
            ("latency p50 / p99", f"{s['latency_p50_s']} / {s['latency_p99_s']} s"),
            ("TTFT p50 (streams)", f"{s['ttft_p50_s']} s"), ("answered / s", s["answered_per_s"]),
            ("faults injected", len(s["faults"])), ("leaked KV pages", sum(s["leaked_pages"].values())),
            ("min free KV pages", s["min_free_pages"]), ("RSS after warm-up -> end", rss)]
    return "\n".join(["| measure | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def plot(s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for result, color in (("answered", "tab:blue"), ("failed", "tab:orange"), ("lost", "tab:red"),
                          ("malformed", "tab:purple")):
        pts = [(t, lat) for t, lat, r in s["outcomes"] if r.startswith(result)]
        if pts:
            ax1.scatter(*zip(*pts, strict=True), s=3, color=color, label=result)
    ax1.set_ylabel("latency (s)")
    ax1.legend(loc="upper right")
    rows = s["samples"]
    for name in sorted({n for r in rows for n in r["rss_mb"]}):
        pts = [(r["t"], r["rss_mb"][name]) for r in rows if name in r["rss_mb"]]
        ax2.plot(*zip(*pts, strict=True), label=name)
    ax2.set_ylabel("RSS (MiB)")
    ax2.legend(loc="upper right", fontsize="small")
    for name in sorted({n for r in rows for n in r["workers"]}):
        pts = [(r["t"], r["workers"][name]["free_pages"]) for r in rows
               if name in r["workers"] and r["workers"][name]["free_pages"] is not None]
        if pts:
            ax3.plot(*zip(*pts, strict=True), label=name)
    ax3.set_ylabel("free KV pages")
    ax3.set_xlabel("seconds")
    ax3.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"load: concurrency {s['config']['concurrency']}, {s['sent']} requests, {platform.node()}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an existing server (default: launch one with --launch-args)")
    p.add_argument("--launch-args", default="--prefill-workers 2 --decode-workers 2 --transfer-backend tcp "
                   "--local-prefill-max-tokens 64 --context-length 2048 --max-total-tokens 8192",
                   help="flags of `mixquant-serve launch` when no --url is given")
    p.add_argument("--router-pid", type=int, default=None, help="the router's pid with --url (for its RSS)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=None, help="seconds to run")
    p.add_argument("--requests", type=int, default=None, help="requests to send (instead of a duration)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-words", type=int, default=120, help="longest user message, in words")
    p.add_argument("--disconnect-fraction", type=float, default=0.1)
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--stop-every", type=float, default=0.0, help="SIGSTOP a worker every S seconds (0: never)")
    p.add_argument("--stop-for", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/load", help="prefix of the .json summary and the .png plot")
    args = p.parse_args(argv)
    if not args.duration and not args.requests:
        p.error("give --duration or --requests")
    return args


def _router_pid(launcher_pid: int) -> int | None:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        if "router" in child.cmdline()[1:4]:
            return child.pid
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = LoadConfig(concurrency=args.concurrency, duration=args.duration, requests=args.requests,
                     max_tokens=args.max_tokens, max_words=args.max_words,
                     disconnect_fraction=args.disconnect_fraction,
                     sample_every=args.sample_every, seed=args.seed, stop_every=args.stop_every,
                     stop_for=args.stop_for)
    if args.url:
        summary = asyncio.run(run_load(args.url.rstrip("/"), cfg, args.router_pid))
    else:
        from mixquant_serve.launcher import launched_subprocess

        log = f"{args.out}-cluster.log"
        print(f"launching: mixquant-serve launch {args.launch_args} (log {log})", flush=True)
        with launched_subprocess(args.launch_args.split(), log) as url:
            me = psutil.Process()
            launcher = next(c.pid for c in me.children() if "launch" in c.cmdline())
            summary = asyncio.run(run_load(url, cfg, _router_pid(launcher)))
    summary["machine"] = f"{_cpu_name()} ({os.cpu_count()} CPUs), {platform.node()}"
    Path(f"{args.out}.json").write_text(json.dumps(summary, indent=1))
    plot(summary, Path(f"{args.out}.png"))
    print(table(summary))
    for problem in summary["problems"][:20]:
        print("  problem:", problem)
    print(f"summary {args.out}.json, plot {args.out}.png")
    bad = summary["lost"] or summary["malformed"] or any(summary["leaked_pages"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
