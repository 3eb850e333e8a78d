"""Load with faults on a real 2 prefill + 2 decode cluster (tcp): 48 concurrent agent-like requests, a third
of them abandoned by their clients mid-stream or mid-wait, and one prefill worker SIGKILLed while they run.
Every request whose client waits gets its answer, the survivors end idle with every KV page back, and the
router reports the dead worker and only it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import httpx
from cluster import get_json, launched

MODEL = "SmolLM2-135M-Instruct"
REQUESTS = 48


async def _request(client: httpx.AsyncClient, url: str, i: int, rng: random.Random) -> str:
    question = f"Question {i}: " + f"tell me about item {i}. " * rng.randint(1, 60)
    body = {"model": MODEL, "max_tokens": rng.randint(1, 40), "stream": rng.random() < 0.7,
            "temperature": rng.choice([0, 0.7, 1.2]), "prompt_cache_key": f"session-{rng.randint(0, 5)}",
            "messages": [{"role": "system", "content": "You are terse. " * rng.randint(1, 30)},
                         {"role": "user", "content": question}]}
    abandon = rng.random() < 0.35
    try:
        if body["stream"]:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                events, stop_after = [], rng.randint(1, 6)
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                    if abandon and len(events) >= stop_after:
                        return "abandoned"
                if events[-1:] != ["[DONE]"] or any(e.startswith('{"error"') for e in events):
                    return f"stream failed: {events[-2:]}"
                return str(r.status_code)
        r = await client.post(f"{url}/v1/chat/completions", json=body,
                              timeout=rng.uniform(0.05, 1.0) if abandon else 180)
        return str(r.status_code)
    except httpx.TimeoutException:
        return "abandoned"


async def _load(url: str) -> tuple[list[str], int]:
    rng = random.Random(1)
    async with httpx.AsyncClient(timeout=180) as client:
        async def kill_a_prefill_worker() -> int:
            await asyncio.sleep(4)
            victim = next(w for w in (await client.get(f"{url}/workers")).json() if w["role"] == "prefill")
            os.kill(victim["info"]["pid"], signal.SIGKILL)
            return victim["url"]
        *results, killed = await asyncio.gather(*[_request(client, url, i, rng) for i in range(REQUESTS)],
                                                kill_a_prefill_worker())
    return results, killed


def test_abandoned_requests_and_a_killed_prefill_worker_under_load(smollm_path):
    args = ["--prefill-workers", "2", "--decode-workers", "2", "--transfer-backend", "tcp",
            "--context-length", "2048", "--max-total-tokens", "4096"]
    with launched(*args) as url:
        results, killed = asyncio.run(_load(url))
        waited = [r for r in results if r != "abandoned"]
        assert waited and all(r == "200" for r in waited), results
        assert len(waited) < REQUESTS  # some clients did go away
        deadline = time.monotonic() + 60
        while True:
            workers = get_json(f"{url}/workers")
            survivors = [w["stats"] for w in workers if w["healthy"]]
            clean = all(s["num_running"] == 0 and s["num_waiting"] == 0
                        and s["free_pages"] + s["cached_pages"] == s["total_pages"] for s in survivors)
            if clean:
                break
            assert time.monotonic() < deadline, f"survivors not idle or KV pages leaked: {survivors}"
            time.sleep(0.5)
        assert sorted(w["url"] for w in workers if not w["healthy"]) == [killed]
        assert len(survivors) == 3
