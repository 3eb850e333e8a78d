"""Session keys (their order of precedence and the hash fallback) and session affinity through the router."""

from __future__ import annotations

import httpx
import pytest
from conftest import metric, wait_for

from router.sessions import SessionTable, conversation_key, explicit_key, prompt_key

SYSTEM = {"role": "system", "content": "You are a careful agent."}


def test_explicit_key_precedence() -> None:
    headers = {"x-session-id": "hdr", "x-smg-routing-key": "smg"}
    assert explicit_key(headers, "field", "user") == "field"
    assert explicit_key(headers, None, "user") == "hdr"
    assert explicit_key({"x-smg-routing-key": "smg"}, None, "user") == "smg"
    assert explicit_key({}, None, "user") == "user"
    assert explicit_key({}, "", "") is None


def test_conversation_key_is_the_system_prompt_and_first_user_turn() -> None:
    first = [SYSTEM, {"role": "user", "content": "Fix the bug."}]
    later = first + [{"role": "assistant", "content": "Looking."}, {"role": "tool", "content": "log..."},
                     {"role": "user", "content": "And now?"}]
    assert conversation_key(first) == conversation_key(later)
    assert conversation_key(first).startswith("auto-")
    assert conversation_key(first) != conversation_key([SYSTEM, {"role": "user", "content": "Other task."}])
    assert conversation_key(first) != conversation_key([{"role": "user", "content": "Fix the bug."}])
    assert prompt_key(list(range(40))) == prompt_key(list(range(32)) + [7, 7])
    assert prompt_key(list(range(40))) != prompt_key([1] + list(range(39)))


def test_table_lru_capacity_and_counts() -> None:
    table = SessionTable(ttl=0, capacity=2)
    table.bind("a", "w0", "p0", now=0)
    table.bind("b", "w1", None, now=1)
    table.touch("a", now=2)  # a is now the most recently used
    table.bind("c", "w0", "p1", now=3)
    assert table.get("b", 100) is None and table.get("a", 10**9) is not None  # ttl 0: no idle expiry
    assert table.expired["capacity"] == 1 and table.get("a").requests == 1
    assert table.per_worker() == {"w0": 2, "p0": 1, "p1": 1}


def on_worker(api, session: str) -> set[str]:
    return {w.worker_id for w in api.workers for g in w.generate_reqs() if g.session_id == session}


@pytest.mark.parametrize("how", ["prompt_cache_key", "x-session-id", "x-smg-routing-key", "user"])
def test_a_session_stays_on_its_worker_while_another_is_idle(api, how: str) -> None:
    key = f"sess-{how}"
    body = {"model": api.model, "max_tokens": 1,
            "messages": [SYSTEM, {"role": "user", "content": f"task {how}"}]}
    headers = {}
    if how in ("prompt_cache_key", "user"):
        body[how] = key
    else:
        headers[how] = key
    before = metric(api.router.base, "mixquant_router_placements", kind="affinity")

    def send() -> None:
        r = httpx.post(api.router.base + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text

    send()
    (home,) = on_worker(api, key)
    bound = next(w for w in api.workers if w.worker_id == home)
    bound.busy = 5  # much busier than the other worker, but not overloaded (nothing waits)
    wait_for(lambda: httpx.get(api.router.base + "/workers").json()[api.workers.index(bound)]["load"]
             ["running"] == 5, 3)
    for turn in range(3):
        body["messages"] = body["messages"] + [{"role": "assistant", "content": "ok"},
                                               {"role": "user", "content": f"turn {turn}"}]
        send()
    assert on_worker(api, key) == {home}
    assert metric(api.router.base, "mixquant_router_placements", kind="affinity") - before == 3
    # a new session goes to the idle worker
    other = dict(body, messages=[SYSTEM, {"role": "user", "content": f"unrelated to {how}"}])
    other.pop("prompt_cache_key", None)
    other.pop("user", None)
    r = httpx.post(api.router.base + "/v1/chat/completions", json=other, timeout=30)
    assert {w.worker_id for w in api.workers for g in w.generate_reqs() if g.rid == r.json()["id"]} != {home}


def test_clients_that_send_nothing_keep_their_conversation_together(api) -> None:
    client = api.router.client()
    messages = [SYSTEM, {"role": "user", "content": "keyless conversation"}]
    first = client.chat.completions.create(model=api.model, messages=messages, max_tokens=1)
    req = next(g for w in api.workers for g in w.generate_reqs() if g.rid == first.id)
    assert req.session_id == conversation_key([m for m in messages])
    home = next(w for w in api.workers if req in w.generate_reqs())
    home.busy = 5
    wait_for(lambda: httpx.get(api.router.base + "/workers").json()[api.workers.index(home)]["load"]
             ["running"] == 5, 3)
    for turn in range(2):
        messages += [{"role": "assistant", "content": "sure"}, {"role": "user", "content": f"next {turn}"}]
        client.chat.completions.create(model=api.model, messages=messages, max_tokens=1)
    assert on_worker(api, req.session_id) == {home.worker_id}
    snapshot = httpx.get(api.router.base + "/workers").json()
    assert snapshot[api.workers.index(home)]["sessions"] >= 1
    # completions: the first prompt tokens name the session
    prompt = list(range(500, 540))
    r = client.completions.create(model=api.model, prompt=prompt, max_tokens=1)
    req = next(g for w in api.workers for g in w.generate_reqs() if g.rid == r.id)
    assert req.session_id == prompt_key(prompt)
