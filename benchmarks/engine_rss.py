"""Does an engine's resident memory grow with the requests it serves? The offline Engine (the embedded model,
BF16 both phases, 8192-token KV pool) runs rounds of 8 requests of random length (3-120 words, 1-16 new
tokens, greedy or sampled); RSS is read after a warm-up and every 10 rounds, then once more after glibc's
malloc_trim(0) hands freed heap back to the system.

    .venv/bin/python benchmarks/engine_rss.py --rounds 30
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 .venv/bin/python benchmarks/engine_rss.py --rounds 30   # no oneDNN cache

What stays after malloc_trim is held memory (caches, leaks); what malloc_trim returns was heap fragmentation.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random

import psutil
import torch

from mixquant_serve import Engine, SamplingParams

WORDS = ["cache", "worker", "token", "decode", "prefill", "page", "batch", "session", "socket", "retry"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(max_total_tokens=8192, context_length=2048, prefill_precision="bf16")
    rng, proc = random.Random(0), psutil.Process()

    def one_round() -> None:
        prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120))) for _ in range(8)]
        engine.generate(prompts, [SamplingParams(max_tokens=rng.randint(1, 16), temperature=rng.choice([0, 0.7]))
                                  for _ in prompts])

    def growth() -> float:
        gc.collect()
        return round((proc.memory_info().rss - base) / 2**20, 1)

    for _ in range(5):
        one_round()
    gc.collect()
    base = proc.memory_info().rss
    print(f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'default')}, "
          f"RSS after warm-up {base / 2**20:.0f} MiB", flush=True)
    for i in range(1, args.rounds + 1):
        one_round()
        if i % 10 == 0:
            print(f"after {i * 8} requests: RSS +{growth()} MiB (requests held: {len(engine.requests)})", flush=True)
    before = growth()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"malloc_trim(0): RSS growth {before} -> {growth()} MiB", flush=True)


if __name__ == "__main__":
    main()
