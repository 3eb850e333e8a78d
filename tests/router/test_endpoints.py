"""Model list, health, worker snapshots and Prometheus metrics of a running router."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def families(api) -> dict[str, object]:
    text = httpx.get(api.router.base + "/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_models(api) -> None:
    models = api.router.client().models.list().data
    assert [m.id for m in models] == [api.model] and models[0].owned_by == "mixquant-serve"
    card = httpx.get(api.router.base + "/v1/models").json()["data"][0]
    assert card["max_model_len"] == api.workers[0].context_length
    assert api.router.client().models.retrieve(api.model).id == api.model


def test_workers_snapshot(api) -> None:
    snapshot = httpx.get(api.router.base + "/workers").json()
    assert [w["url"] for w in snapshot] == [w.address for w in api.workers]
    assert all(w["healthy"] for w in snapshot)
    assert [w["info"]["worker_id"] for w in snapshot] == ["w0", "w1"]
    assert snapshot[0]["stats"]["total_pages"] == 64 and "decode-steps" in snapshot[0]["stats"]["counters"]


def test_metrics_families_and_counts(api) -> None:
    client = api.router.client()
    before = families(api)
    client.chat.completions.create(model=api.model, messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=3)
    list(client.completions.create(model=api.model, prompt="hi", max_tokens=3, stream=True))
    httpx.post(api.router.base + "/v1/completions", json={"model": "nope", "prompt": "x"})
    after = families(api)

    def value(fams, name: str, **labels: str) -> float:
        samples = [s for s in fams[name].samples if s.name in (name, name + "_total")]
        return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))

    def count(fams, name: str) -> float:
        return sum(s.value for s in fams[name].samples if s.name == name + "_count")

    req = "mixquant_router_requests"
    assert value(after, req, endpoint="/v1/chat/completions", status="200") - \
        value(before, req, endpoint="/v1/chat/completions", status="200") == 1
    assert value(after, req, endpoint="/v1/completions", status="404") - \
        value(before, req, endpoint="/v1/completions", status="404") == 1
    tokens = "mixquant_router_completion_tokens"
    assert value(after, tokens) - value(before, tokens) == 6
    assert value(after, "mixquant_router_prompt_tokens") > value(before, "mixquant_router_prompt_tokens")
    assert "mixquant_router_cached_tokens" in after
    for hist, grew in (("mixquant_router_time_to_first_token_seconds", 2),
                       ("mixquant_router_e2e_request_latency_seconds", 2),
                       ("mixquant_router_inter_token_latency_seconds", 4)):
        assert after[hist].type == "histogram"
        assert count(after, hist) - count(before, hist) == grew, hist
    assert after["mixquant_router_inflight_requests"].type == "gauge"
    for name in ("healthy", "num_running", "num_waiting", "queued_tokens", "free_pages", "total_pages",
                 "cached_pages", "prefill_tokens", "decode_steps"):
        fam = after["mixquant_worker_" + name]
        assert fam.type == "gauge" and {s.labels["worker"] for s in fam.samples} == {"w0", "w1"}, name
    steps = {s.labels["worker"]: s.value for s in after["mixquant_worker_decode_steps"].samples}
    assert steps["w0"] > 0
