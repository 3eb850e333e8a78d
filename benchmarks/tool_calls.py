"""Constrained tool calls on CPU: time per generated token with the tool-call grammar against the same
requests decoded without it (embedded SmolLM2-135M, the Engine the workers run, same process, same run).

    .venv/bin/python benchmarks/tool_calls.py [--rounds 5 --batch 1 8 --max-tokens 48 --threads 1]

Workloads (prompts and grammars built by the router's own code): "named" (tool_choice names a function:
the output is that call's arguments), "required" (any offered function), "auto" (a few-shot agent turn: free
text, then each call the model opens is held to the grammar). Each round runs every workload with and
without its grammar, back to back, with the same seeds (free runs ignore EOS); time per token counts the
decode steps that run the whole batch (from every request's first token to the first finish), the overhead
is the median over rounds of each round's constrained / free ratio (both runs of a round share the machine's
load), and the time spent in llguidance itself (mask + advance) is measured apart. Appends rows to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import msgspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_throughput import cpu_name  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Constrained tool calls on CPU (benchmarks/tool_calls.py)"
HEADER = ("| date | CPU | threads | workload | batch | tokens timed/run | ms/token free | ms/token constrained "
          "| overhead | llguidance ms/token |\n|---|---|---|---|---|---|---|---|---|---|")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
FLIGHTS = {"type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"},
                                            "max_stops": {"type": "integer", "minimum": 0, "maximum": 3}},
           "required": ["origin", "destination", "max_stops"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": p, "strict": True}}
         for n, p in (("get_weather", WEATHER), ("search_flights", FLIGHTS))]


def few_shot(question: str) -> list[dict]:
    """Earlier turns that answered with calls: then the model opens calls in "auto" too (on its own it
    rarely does), and unconstrained about one in four is broken (a made-up function, unit or argument)."""
    out = [{"role": "system", "content": "You are a weather agent: you answer every question with a tool call."}]
    for i, (city, unit) in enumerate([("Rome", "celsius"), ("Boston", "fahrenheit"), ("Lima", "celsius")]):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": unit})}}
        out += [{"role": "user", "content": f"Weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [call]}]
    return out + [{"role": "user", "content": question}]


WORKLOADS = {
    "named": ([{"role": "user", "content": "Find a flight from Oslo to Rome."}],
              {"type": "function", "function": {"name": "search_flights"}}),
    "required": ([{"role": "user", "content": "What is the weather in Paris?"}], "required"),
    "auto": (few_shot("And in Tokyo?"), "auto"),
}


class Timed:
    """A matcher whose llguidance work (consume_token) is timed; masks are timed around Grammars.apply."""

    def __init__(self, inner, clock: list[float]) -> None:
        self.inner, self.clock = inner, clock

    def consume_token(self, token: int) -> bool:
        t = time.perf_counter()
        ok = self.inner.consume_token(token)
        self.clock[0] += time.perf_counter() - t
        return ok

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def instrument(engine) -> list[float]:
    clock = [0.0]
    grammars = engine.grammars
    make, apply = grammars.matcher, grammars.apply

    def matcher(params):
        m = make(params)
        return None if m is None else Timed(m, clock)

    def timed_apply(logits, rows):
        t = time.perf_counter()
        apply(logits, [(row, m.inner) for row, m in rows])
        clock[0] += time.perf_counter() - t

    grammars.matcher, grammars.apply = matcher, timed_apply
    return clock


def decode_run(engine, ids: list[int], params: list) -> tuple[float, int]:
    """(seconds, tokens) of the decode steps that run the whole batch: from when every request has its first
    token until the first one finishes (a batch that shrinks costs more per token, constrained or not)."""
    rids = [f"r{i}-{time.monotonic_ns()}" for i in range(len(params))]
    for rid, p in zip(rids, params, strict=True):
        engine.add_request(rid, ids, p)
    counts = dict.fromkeys(rids, 0)
    start = end = None
    base = total = 0
    while engine.has_work:
        outs = engine.step()
        for out in outs:
            counts[out.rid] += len(out.token_ids)
        if start is not None and end is None:
            end, total = (time.perf_counter(), sum(counts.values())) if any(o.finished for o in outs) else (None, 0)
        if start is None and all(counts.values()):
            start, base = time.perf_counter(), sum(counts.values())
    if start is None or end is None:
        return 0.0, 0
    return end - start, total - base


def prepare(engine, name: str):
    from router.openai_api import ChatCompletionRequest
    from router.prompts import encode_chat

    messages, choice = WORKLOADS[name]
    prompt = encode_chat(engine.tokenizer, ChatCompletionRequest(messages=messages, tools=TOOLS, tool_choice=choice))
    return prompt.ids, prompt.tools.grammar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mixquant_serve import Engine, SamplingParams

    engine = Engine(None, prefill_precision="bf16", decode_precision="bf16", context_length=2048,
                    max_total_tokens=32768, max_running_requests=max(args.batch))
    clock = instrument(engine)
    rows = []
    for name in WORKLOADS:
        ids, grammar = prepare(engine, name)
        for batch in args.batch:
            free, held, lib, tokens = [], [], [], []
            for r in range(args.rounds):
                params = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=100 * r + i,
                                         ignore_eos=True) for i in range(batch)]
                s, n = decode_run(engine, ids, params)
                free.append(s / max(n, 1))
                clock[0] = 0.0
                s, n = decode_run(engine, ids, [msgspec.structs.replace(p, ignore_eos=False, grammar=grammar)
                                                for p in params])
                held.append(s / max(n, 1))
                lib.append(clock[0] / max(n, 1))
                tokens.append(n)
            f, h, g = (statistics.median(x) * 1000 for x in (free, held, lib))
            over = statistics.median(b / a for a, b in zip(free, held, strict=True)) - 1  # per round: same load
            rows.append((name, batch, round(statistics.mean(tokens)), f, h, over, g))
            print(f"{name:9s} batch {batch:2d}: {f:6.1f} ms/token free, {h:6.1f} constrained "
                  f"({100 * over:+.1f}%), llguidance {g:.2f} ms/token", flush=True)
    if not args.no_write:
        write(rows, args.threads)


def write(rows: list[tuple], threads: int) -> None:
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{HEADER}\n"
    cpu = f"{cpu_name().split(' (')[0]}, {os.cpu_count()}-core VM (CPU)"
    for name, batch, tokens, f, h, over, g in rows:
        text = text.rstrip("\n") + (f"\n| {date.today()} | {cpu} | {threads} | {name} | {batch} | {tokens} | {f:.1f} "
                                    f"| {h:.1f} | {100 * over:+.1f}% | {g:.2f} |") + "\n"
    RESULTS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
