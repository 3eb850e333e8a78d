"""Multi-turn agent sessions against a disaggregated cluster: does placement keep the history's KV reusable?

    .venv/bin/python benchmarks/agent_sessions.py [--sessions 3 --turns 8 --tool-output-tokens 420]
        [--sweep 0,64,256,1024] [--configs round_robin,affinity,affinity_cd] [--quick]

For each configuration it launches `mixquant-serve launch --mode disaggregated --prefill-workers 2
--decode-workers 2 --transfer-backend tcp --policy P --local-prefill-max-tokens N` itself, then runs
`--sessions` concurrent simulated agents through the OpenAI API (streaming): a system prompt with tool
schemas and a task, then turns that each append the agent's tool call, the tool's output (about
`--tool-output-tokens` tokens of log text) and a request for the next action, so the history grows to about
4k tokens. Keep --sessions odd with 2 decode workers: round robin's one global turn order would otherwise
give each session the same worker every turn (request k of a round of 2n goes to worker k % 2). Configurations:
  round_robin     prefill and decode workers chosen independently per request (the Mix-Quant reference
                  proxy), every prompt prefilled on a prefill worker (N = 0)
  affinity        each session bound to one (prefill, decode) pair, prefill always remote (N = 0)
  affinity_cd     affinity with conditional disaggregation, one run per N of --sweep: deltas shorter than
                  N tokens are prefilled by the decode worker itself
Reported per configuration: TTFT p50/p99 of turn 1 and of turns 2+ (time to the first streamed chunk,
which the router sends only once the first token exists), inter-token latency ((last chunk - first
chunk) / (completion tokens - 1)), prompt tokens computed vs reused from the workers' counters
(computed_prefill_tokens, cached_tokens), KV bytes sent by prefill workers, and completion-token
throughput. The TTFT-per-turn curves go to benchmarks/agent_sessions.png (--plot), the table to stdout and to
benchmarks/RESULTS.md (with the CPU's name). The N with the lowest turn-2+ TTFT p50 is the measured
candidate for router.args.DEFAULT_LOCAL_PREFILL_MAX_TOKENS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from mixquant_serve.launcher import launched_subprocess

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
PLOT = Path(__file__).with_name("agent_sessions.png")
SECTION = "## Agent sessions: placement and conditional disaggregation (benchmarks/agent_sessions.py)"


def _tool(name: str, description: str, *params: str) -> dict[str, Any]:
    properties = {p: {"type": "string"} for p in params}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(params)}}}


TOOLS = [_tool("run_command", "Run a shell command in the repository", "cmd"),
         _tool("read_file", "Read a file of the repository", "path"),
         _tool("edit_file", "Replace text in a file", "path", "old", "new")]
SYSTEM = ("You are a software engineering agent working in a large Python repository. Work step by step: "
          "inspect files, run the tests, make small edits, and explain each action in one sentence. ")
WORDS = ("collected", "passed", "failed", "module", "import", "warning", "cache", "worker", "request",
         "token", "decode", "prefill", "latency", "batch", "page", "session", "retry", "socket", "config")


# ---------------------------------------------------------------- the simulated agents
@dataclass(frozen=True)
class Workload:
    sessions: int = 3
    turns: int = 8
    tool_output_tokens: int = 420
    system_repeats: int = 4  # the system prompt's paragraph, repeated: ~400 tokens with the tools
    max_tokens: int = 24
    seed: int = 0


def tool_output(rng: random.Random, tokens: int, count) -> str:
    """Log-like lines until `count(text)` reaches `tokens`."""
    lines: list[str] = []
    while True:
        n = rng.randrange(1000)
        stamp = f"[{rng.randrange(24):02d}:{rng.randrange(60):02d}]"
        words = " ".join(rng.choice(WORDS) for _ in range(6))
        lines.append(f"{stamp} tests/test_{n % 97}.py::{rng.choice(WORDS)} {words} ({n} ms)")
        text = "\n".join(lines)
        if count(text) >= tokens:
            return text


@dataclass
class Session:
    """One agent's conversation; `messages(turn)` is what turn `turn` (0-based) sends."""

    index: int
    work: Workload
    count: Any  # text -> tokens
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.history = [{"role": "system", "content": SYSTEM * self.work.system_repeats},
                        {"role": "user", "content": f"Task {self.index}: the test suite fails in module "
                                                    f"{self.index}; find the cause and fix it."}]
        self.rng = random.Random(self.work.seed * 1000 + self.index)
        self.turns_built = 1

    def messages(self, turn: int) -> list[dict[str, Any]]:
        while self.turns_built <= turn:
            self._grow(self.turns_built)
            self.turns_built += 1
        return self._cut(turn)

    def _grow(self, turn: int) -> None:
        call_id = f"call_{self.index}_{turn}"
        args = json.dumps({"cmd": f"pytest tests/module_{self.index} -x -k step{turn}"})
        self.history += [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "run_command", "arguments": args}}]},
            {"role": "tool", "tool_call_id": call_id,
             "content": tool_output(self.rng, self.work.tool_output_tokens, self.count)},
            {"role": "user", "content": "Here is the output. What is your next action?"},
        ]

    def _cut(self, turn: int) -> list[dict[str, Any]]:
        return self.history[: 2 + 3 * turn]


@dataclass
class TurnResult:
    session: int
    turn: int
    ttft: float
    itl: float | None
    e2e: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    failed: bool = False


async def run_turn(client: Any, model: str, session: Session, turn: int, max_tokens: int) -> TurnResult:
    start = time.perf_counter()
    first = last = None
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=session.messages(turn), tools=TOOLS, max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, prompt_cache_key=f"agent-{session.index}",
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            first = first if first is not None else now
            last = now
        if chunk.usage is not None:
            usage = chunk.usage
    assert first is not None and usage is not None, "the stream ended without output or usage"
    n = usage.completion_tokens
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return TurnResult(session.index, turn, first - start, (last - first) / (n - 1) if n > 1 else None,
                      time.perf_counter() - start, usage.prompt_tokens, cached or 0, n)


async def run_sessions(base: str, model: str, work: Workload, count: Any, log: Any = print
                       ) -> list[TurnResult]:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=os.environ.get("MIXQUANT_API_KEY", "none"),
                         max_retries=0, timeout=600)
    sessions = [Session(i, work, count) for i in range(work.sessions)]

    async def agent(s: Session) -> list[TurnResult]:
        out = []
        for turn in range(work.turns):
            try:
                r = await run_turn(client, model, s, turn, work.max_tokens)
            except (openai.APIError, AssertionError) as e:  # counted as a failed turn; the agent goes on
                log(f"    session {s.index} turn {turn + 1}/{work.turns} FAILED: {e}")
                out.append(TurnResult(s.index, turn, math.nan, None, math.nan, 0, 0, 0, failed=True))
                continue
            log(f"    session {s.index} turn {turn + 1}/{work.turns}: prompt {r.prompt_tokens} "
                f"(cached {r.cached_tokens}) TTFT {r.ttft * 1000:.0f} ms")
            out.append(r)
        return out

    try:
        return [r for rs in await asyncio.gather(*(agent(s) for s in sessions)) for r in rs]
    finally:
        await client.close()


async def warm_up(base: str, model: str, decode_workers: int, count: Any) -> None:
    """Every worker's first requests (one-time allocations, lazy imports) before anything is measured: a long
    prompt (a prefill worker computes it) and a short one (the decode worker may), one per decode worker at
    a time (concurrent requests without a shared prefix spread over the workers)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base + "/v1", api_key=os.environ.get("MIXQUANT_API_KEY", "none"), max_retries=0,
                         timeout=600)
    long_text = tool_output(random.Random(-1), 600, count)

    async def one(i: int, text: str) -> None:  # distinct first tokens: no cached prefix pulls them together
        messages = [{"role": "system", "content": f"Warm-up {i}."}, {"role": "user", "content": text}]
        await client.chat.completions.create(model=model, messages=messages, max_tokens=2,
                                             prompt_cache_key=f"warm-up-{i}-{len(text)}")

    try:
        for text in (long_text, "Say hello."):
            await asyncio.gather(*(one(i, text) for i in range(decode_workers)))
    finally:
        await client.close()


# ---------------------------------------------------------------- the cluster and its counters
def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


COUNTERS = ("computed_prefill_tokens", "cached_tokens", "prompt_tokens", "remote_prefill_tokens",
            "kv_bytes_sent", "kv_bytes_received", "generated_tokens")


def worker_counters(workers: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """role -> counter -> sum over that role's workers (from GET /workers)."""
    out: dict[str, dict[str, float]] = {}
    for w in workers:
        counters = (w.get("stats") or {}).get("counters", {})
        role = out.setdefault(w["role"], dict.fromkeys(COUNTERS, 0.0))
        for name in COUNTERS:
            role[name] += float(counters.get(name, 0.0))
    return out


def counter_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
                  ) -> dict[str, dict[str, float]]:
    return {role: {k: v - before.get(role, {}).get(k, 0.0) for k, v in values.items()}
            for role, values in after.items()}


# ---------------------------------------------------------------- results
@dataclass
class ConfigResult:
    name: str
    policy: str
    local_prefill_max_tokens: int
    turns: list[TurnResult]
    counters: dict[str, dict[str, float]]
    seconds: float

    @property
    def ok(self) -> list[TurnResult]:
        return [t for t in self.turns if not t.failed]

    def ttft(self, later: bool) -> list[float]:
        return [t.ttft for t in self.ok if (t.turn > 0) == later]

    def ttft_by_turn(self) -> list[float]:
        last = max(t.turn for t in self.turns)
        return [statistics.median([t.ttft for t in self.ok if t.turn == k] or [math.nan]) for k in range(last + 1)]

    def row(self) -> dict[str, Any]:
        itl = [t.itl for t in self.ok if t.itl is not None]
        c = self.counters
        on_prefill = c.get("prefill", {}).get("computed_prefill_tokens", 0.0)
        on_decode = sum(c.get(role, {}).get("computed_prefill_tokens", 0.0) for role in ("decode", "colocated"))
        reused = sum(c.get(role, {}).get("cached_tokens", 0.0) for role in ("decode", "colocated"))
        first, later = self.ttft(False), self.ttft(True)
        return {
            "config": self.name,
            "TTFT turn 1 p50/p99 (ms)": f"{pct(first, 50) * 1e3:.0f} / {pct(first, 99) * 1e3:.0f}",
            "TTFT turns 2+ p50/p99 (ms)": f"{pct(later, 50) * 1e3:.0f} / {pct(later, 99) * 1e3:.0f}",
            "ITL p50 (ms)": f"{pct(itl, 50) * 1e3:.1f}" if itl else "-",
            "prompt tokens computed on prefill / decode workers": f"{on_prefill:.0f} / {on_decode:.0f}",
            "prompt tokens reused": f"{reused:.0f}",
            "KV MiB sent": f"{c.get('prefill', {}).get('kv_bytes_sent', 0.0) / 2**20:.1f}",
            "tok/s": f"{sum(t.completion_tokens for t in self.turns) / self.seconds:.1f}",
            "failed turns": str(sum(t.failed for t in self.turns)),
        }


def pct(values: list[float], q: float) -> float:
    """The q-th percentile, nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def table(results: list[ConfigResult]) -> str:
    rows = [r.row() for r in results]
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def best_threshold(results: list[ConfigResult]) -> ConfigResult | None:
    swept = [r for r in results if r.name.startswith("affinity_cd")]
    return min(swept, key=lambda r: pct(r.ttft(True), 50)) if swept else None


def plot(results: list[ConfigResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        curve = r.ttft_by_turn()
        ax.plot(range(1, len(curve) + 1), [v * 1e3 for v in curve], marker="o", label=r.name)
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def append_results(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in old:
        old = old.rstrip("\n") + f"\n\n{SECTION}\n"
    RESULTS.write_text(old.rstrip("\n") + "\n\n" + text + "\n")


# ---------------------------------------------------------------- main
def configs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    out = []
    for name in args.configs.split(","):
        if name == "affinity_cd":
            out += [(f"affinity_cd N={n}", "affinity", n) for n in (int(x) for x in args.sweep.split(","))]
        elif name in ("round_robin", "affinity"):
            out.append((name, name, 0))
        else:
            raise SystemExit(f"unknown configuration {name!r}")
    return out


def run_config(name: str, policy: str, threshold: int, args: argparse.Namespace, work: Workload,
               count: Any) -> ConfigResult:
    launch = ["--mode", "disaggregated", "--prefill-workers", str(args.prefill_workers), "--decode-workers",
              str(args.decode_workers), "--transfer-backend", "tcp", "--policy", policy,
              "--local-prefill-max-tokens", str(threshold), "--context-length", str(args.context_length),
              "--max-total-tokens", str(args.max_total_tokens), *args.launch_arg]
    print(f"[{name}] launching: {' '.join(launch)}", flush=True)
    log = Path(args.log_dir) / f"agent_sessions-{name.replace(' ', '_').replace('=', '')}.log"
    with launched_subprocess(launch, log) as base:
        model = get_json(base + "/v1/models")["data"][0]["id"]
        asyncio.run(warm_up(base, model, args.decode_workers, count))
        before = worker_counters(get_json(base + "/workers"))
        start = time.perf_counter()
        log_turn = (lambda m: print(m, flush=True)) if args.verbose else (lambda m: None)
        turns = asyncio.run(run_sessions(base, model, work, count, log=log_turn))
        seconds = time.perf_counter() - start
        time.sleep(1.5)  # the last heartbeats carry the last counters
        after = worker_counters(get_json(base + "/workers"))
    result = ConfigResult(name, policy, threshold, turns, counter_delta(before, after), seconds)
    print(f"[{name}] done in {seconds:.1f} s: " + ", ".join(f"{k} {v}" for k, v in result.row().items()
                                                           if k != "config"), flush=True)
    return result


def token_counter(model_path: str | None) -> Any:
    from mixquant_serve.models.embedded import resolve_model_path
    from mixquant_serve.tokenizer import Tokenizer

    tok = Tokenizer.from_path(resolve_model_path(model_path))
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=3, help="concurrent agents (odd: see above)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tool-output-tokens", type=int, default=420)
    p.add_argument("--max-tokens", type=int, default=24, help="tokens generated per turn (ignore_eos)")
    p.add_argument("--configs", default="round_robin,affinity,affinity_cd")
    p.add_argument("--sweep", default="64,256,1024", help="--local-prefill-max-tokens values of affinity_cd")
    p.add_argument("--prefill-workers", type=int, default=2)
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--context-length", type=int, default=8192)
    p.add_argument("--max-total-tokens", type=int, default=32768, help="KV cache tokens per worker")
    p.add_argument("--model-path", default=None, help="for sizing tool outputs (default: the embedded model)")
    p.add_argument("--launch-arg", action="append", default=[], help="extra flag for the launcher (repeat)")
    p.add_argument("--log-dir", default="/tmp")
    p.add_argument("--plot", default=str(PLOT), help="where the TTFT-per-turn PNG goes")
    p.add_argument("--quick", action="store_true", help="3 sessions x 3 turns of 120-token tool outputs")
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md or draw the plot")
    p.add_argument("--verbose", action="store_true", help="print every turn")
    args = p.parse_args(argv)
    if args.quick:
        args.sessions, args.turns, args.tool_output_tokens, args.max_tokens = 3, 3, 120, 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model_path:
        args.launch_arg += ["--model-path", args.model_path]
    work = Workload(args.sessions, args.turns, args.tool_output_tokens, max_tokens=args.max_tokens)
    count = token_counter(args.model_path)
    final = count(json.dumps(Session(0, work, count).messages(work.turns - 1)))
    print(f"{work.sessions} sessions x {work.turns} turns, tool outputs of {work.tool_output_tokens} tokens, "
          f"last turn ~{final} tokens of JSON; CPU: {cpu_name()}", flush=True)
    results = [run_config(name, policy, n, args, work, count) for name, policy, n in configs(args)]
    text = table(results)
    print("\n" + text)
    best = best_threshold(results)
    if best is not None:
        print(f"\nlowest turn-2+ TTFT p50 with conditional disaggregation: {best.name}")
    if args.no_results:
        return
    title = (f"{work.sessions} agent sessions x {work.turns} turns, "
             f"{args.prefill_workers}P+{args.decode_workers}D tcp {' '.join(args.launch_arg)}, {cpu_name()}")
    path = Path(args.plot)
    plot(results, path, title)
    note = f"Best N (lowest turn-2+ TTFT p50): {best.name}." if best else ""
    if args.launch_arg:
        note += f" Extra launcher flags: `{' '.join(args.launch_arg)}`."
    append_results(f"{date.today()}: {title}; tool outputs of {work.tool_output_tokens} tokens, "
                   f"{work.max_tokens} tokens generated per turn; plot: benchmarks/{path.name}. {note}"
                   f"\n\n{text}")
    print(f"\nwrote {path} and appended to {RESULTS}")


if __name__ == "__main__":
    main()
