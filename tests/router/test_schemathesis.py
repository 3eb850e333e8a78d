"""Schema-driven fuzzing of a real router (scripted workers) from its own OpenAPI document (GET /openapi.json):
schemathesis generates requests for every operation, both ones that fit the schema and ones that break it.
No answer is a 5xx, every error has OpenAI's shape, every 200 of the generation endpoints is a completion
or an SSE stream ending in [DONE], and the router is healthy afterwards. A hand-written fuzz test of the same
endpoints is test_fuzz_api.py; this one follows the document, so it also checks that the document tells
the truth about the bodies the router takes."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

GENERATION = ("/v1/chat/completions", "/v1/completions")


def _error_problems(body) -> list[str]:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not err["message"]:
        return [f"not an OpenAI error: {str(body)[:300]}"]
    return [] if {"type", "param", "code"} <= set(err) else [f"error lacks fields: {err}"]


def _problems(path: str, r: schemathesis.Response) -> list[str]:
    if r.status_code >= 500:
        return [f"{r.status_code}: {r.text[:300]}"]
    if r.status_code >= 400:
        return _error_problems(r.json())
    if path not in GENERATION:
        return []
    if "".join(r.headers.get("content-type", [])).startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return [f"stream without [DONE]: {r.text[-200:]}"]
        for e in events[:-1]:
            json.loads(e)
        return []
    return [] if "choices" in r.json() else [f"200 without choices: {r.text[:200]}"]


@pytest.fixture(scope="module")
def schema(cluster):
    doc = httpx.get(f"{cluster.router.base}/openapi.json", timeout=10).json()
    assert doc["paths"]["/v1/chat/completions"]["post"]["requestBody"], "the document lacks the request body"
    return schemathesis.openapi.from_dict(doc)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_of_the_openapi_document(api, schema, mode):
    base, session, seen = api.router.base, requests.Session(), Counter()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(mode))
    def run(case) -> None:
        path = case.operation.path
        if path in GENERATION and isinstance(case.body, dict):
            case.body.setdefault("model", api.model) if mode is GenerationMode.POSITIVE else None
        r = case.call(base_url=base, session=session, timeout=60)
        seen[(case.operation.label, r.status_code)] += 1
        problems = _problems(path, r)
        assert not problems, (case.operation.label, case.body, problems)

    run()
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    labels = {label for label, _ in seen}
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= labels, seen
    if mode is GenerationMode.POSITIVE:  # bodies that fit the schema do get answered, not only refused
        assert any(status == 200 for (label, status) in seen if label.startswith("POST")), seen
