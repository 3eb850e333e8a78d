"""API keys (401 without a valid one on /v1/*) and the per-client rate limit (429 with Retry-After)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import RouterProcess

from router.security import RateLimiter, key_matches

KEYS = ("key-one", "key-two")
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def guarded(cluster, tokenizer_dir, tmp_path_factory) -> Iterator[RouterProcess]:
    router = RouterProcess(tokenizer_dir, [w.address for w in cluster.workers],
                           tmp_path_factory.mktemp("sec") / "router.log", "--served-model-name", "m",
                           "--api-key", ",".join(KEYS), "--rate-limit", "2", "--rate-limit-burst", "4")
    try:
        yield router.wait_ready()
    finally:
        router.stop()


def check_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


def test_requests_without_a_valid_key_get_401(guarded: RouterProcess) -> None:
    chat = guarded.base + "/v1/chat/completions"
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 1}
    check_401(httpx.post(chat, json=body))
    check_401(httpx.post(chat, json=body, headers={"Authorization": "Bearer key-three"}))
    check_401(httpx.post(chat, json=body, headers={"Authorization": "Basic key-one"}))
    check_401(httpx.get(guarded.base + "/v1/models"))
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)
    for key in KEYS:
        r = guarded.client(api_key=key).chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)
        assert r.choices[0].message.content


def test_operator_endpoints_stay_open(guarded: RouterProcess) -> None:
    for path in ("/health", "/metrics", "/workers"):
        assert httpx.get(guarded.base + path).status_code == 200, path


def test_rate_limit_per_key(guarded: RouterProcess) -> None:
    headers = {"Authorization": "Bearer key-two"}
    statuses = [httpx.get(guarded.base + "/v1/models", headers=headers) for _ in range(8)]
    limited = [r for r in statuses if r.status_code == 429]
    assert len(limited) >= 3 and statuses[0].status_code == 200  # a burst of 4 passes, at 2 per second
    err = limited[0].json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert int(limited[0].headers["retry-after"]) >= 1
    other = httpx.get(guarded.base + "/v1/models", headers={"Authorization": "Bearer key-one"})
    assert other.status_code == 200  # another key has its own bucket
    with pytest.raises(openai.RateLimitError):
        for _ in range(6):
            guarded.client(api_key="key-two").models.list()


def test_token_bucket() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.wait("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait("a", now=0.0) == pytest.approx(0.5)
    assert limiter.wait("b", now=0.0) == 0.0  # clients do not share buckets
    assert limiter.wait("a", now=0.5) == 0.0  # one token came back after 1/rate seconds
    assert limiter.wait("a", now=0.5) > 0
    assert RateLimiter(rate=0.5).burst == 1.0


def test_key_matching() -> None:
    assert key_matches("key-two", KEYS) and not key_matches("key-tw", KEYS) and not key_matches("", KEYS)
