"""A worker busy in one engine step longer than the router's --worker-timeout stays healthy and answers.

The worker's loop thread sends heartbeats between steps; during a long step (here one 1.5k-token NVFP4
prefill chunk on CPU, several seconds) its step-heartbeat thread keeps repeating the latest WorkerStats.
Without it the router would declare the worker dead after the timeout and fail the request with a 503.
"""

from __future__ import annotations

import time

import openai
from cluster import get_json, launched, wait_idle_no_leaks

MODEL = "SmolLM2-135M-Instruct"
TIMEOUT_S = 1.5  # workers beat every 0.5 s


def test_a_step_longer_than_the_worker_timeout_is_not_a_dead_worker(smollm_path):
    args = ["--mode", "colocated", "--prefill-precision", "nvfp4", "--context-length", "4096",
            "--chunked-prefill-size", "4096", "--max-total-tokens", "8192", "--worker-timeout", str(TIMEOUT_S)]
    prompt = " ".join(f"Record {i}: the sensor at station {i % 37} read {i * 7 % 101} units." for i in range(80))
    with launched(*args) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        start = time.monotonic()
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        elapsed = time.monotonic() - start
        assert 1000 < r.usage.prompt_tokens <= 4094, r.usage  # one prefill chunk: the whole prompt in one step
        # the premise: that single step outlasted the router's timeout
        assert elapsed > 2 * TIMEOUT_S, f"the request took only {elapsed:.2f} s; the test needs a longer step"
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
        workers = get_json(f"{url}/workers")
        assert workers and all(w["healthy"] for w in workers), workers
        wait_idle_no_leaks(url)
