"""--bf16-tail-tokens through the launcher: every worker gets it, /workers and /metrics show it, and a
disaggregated cluster serves with it (the decode worker computes the tail, the prefill worker the rest)."""

from __future__ import annotations

import httpx
import openai
import pytest
from cluster import get_json, launched, wait_idle_no_leaks

from mixquant_serve.config import ConfigError, EngineConfig
from mixquant_serve.launcher import Cluster, ClusterSpec

MODEL = "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_the_launcher_gives_every_worker_the_tail(mode):
    spec = ClusterSpec(EngineConfig(model_path="/m", bf16_tail_tokens=32), mode=mode, prefill_workers=2)
    workers = [c for c in Cluster(spec).plan() if c.name != "router"]
    assert len(workers) == (1 if mode == "colocated" else 3)
    for child in workers:
        i = child.argv.index("--bf16-tail-tokens")
        assert child.argv[i + 1] == "32"


def test_a_tail_below_one_is_refused():
    with pytest.raises(ConfigError, match="--bf16-tail-tokens must be at least 1"):
        EngineConfig(bf16_tail_tokens=0).validate()


def test_disaggregated_cluster_with_a_tail(smollm_path):
    args = ["--prefill-precision", "nvfp4", "--bf16-tail-tokens", "16", "--context-length", "1024",
            "--max-total-tokens", "8192", "--local-prefill-max-tokens", "0"]  # every prompt via the prefill worker
    with launched(*args) as url:
        workers = get_json(f"{url}/workers")
        assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
        assert all(w["bf16_tail_tokens"] == 16 for w in workers)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        question = "Here is a list: " + ", ".join(f"item {i}" for i in range(30)) + ". What is the capital of France?"
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens > 16
        wait_idle_no_leaks(url)
        stats = {w["role"]: w["stats"] for w in get_json(f"{url}/workers")}
        decode = stats["decode"]["counters"]
        assert decode["bf16_tail_tokens_computed"] == 16  # the tail ran on the decode worker
        assert decode["remote_prefill_tokens"] == r.usage.prompt_tokens - 16  # the rest came from prefill
        text = httpx.get(f"{url}/metrics").text
        assert text.count('bf16_tail_tokens="16"') == 2  # one worker_info line per worker
