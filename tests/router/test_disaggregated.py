"""Disaggregated placement through the real router: scripted prefill and decode workers on real sockets.

Each request goes to a decode worker naming its prefill worker; a session keeps its (prefill, decode) pair,
new sessions follow cached prefixes, bindings move only off workers that fail, drain or are overloaded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from conftest import RouterProcess, metric, wait_for
from scripted_worker import Failure, ScriptedWorker

from mixquant_serve.tokenizer import Tokenizer

LOCAL_MAX = 64


@dataclass
class Disagg:
    router: RouterProcess
    prefill: list[ScriptedWorker]
    decode: list[ScriptedWorker]
    model: str = "m"

    @property
    def workers(self) -> list[ScriptedWorker]:
        return self.prefill + self.decode

    def snapshot(self) -> dict[str, dict]:
        return {w["url"]: w for w in httpx.get(self.router.base + "/workers", timeout=5).json()}

    def chat(self, messages: list[dict], session: str | None = None, **kw: object) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": 2, **kw}
        if session:
            body["prompt_cache_key"] = session
        r = httpx.post(self.router.base + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def where(self, rid: str) -> tuple[ScriptedWorker, str | None]:
        """The decode worker that answered `rid` (its last retry) and the prefill url it was told to use."""
        sent = [(g.rid, w, g.prefill_url) for w in self.decode for g in w.generate_reqs()
                if g.rid == rid or g.rid.startswith(rid + "-r")]
        assert sent, f"no decode worker got {rid}"
        _, w, url = max(sent, key=lambda s: len(s[0]) and s[0])
        return w, url

    def by_url(self, url: str | None) -> ScriptedWorker | None:
        return next((w for w in self.workers if w.address == url), None)


def start_disagg(tokenizer: Tokenizer, tokenizer_dir, log, *flags: str) -> Disagg:
    prefill = [ScriptedWorker(tokenizer, f"p{i}", heartbeat_s=0.1, role="prefill").start() for i in range(2)]
    decode = [ScriptedWorker(tokenizer, f"d{i}", heartbeat_s=0.1, role="decode").start() for i in range(2)]
    router = RouterProcess(tokenizer_dir, [], log, "--prefill-urls", ",".join(w.address for w in prefill),
                           "--decode-urls", ",".join(w.address for w in decode), "--served-model-name", "m",
                           "--worker-timeout", "1.0", "--local-prefill-max-tokens", str(LOCAL_MAX), *flags)
    return Disagg(router.wait_ready(), prefill, decode)


def stop_disagg(c: Disagg) -> None:
    c.router.stop()
    for w in c.workers:
        w.stop()


@pytest.fixture(scope="module")
def shared(tokenizer, tokenizer_dir, tmp_path_factory) -> Iterator[Disagg]:
    c = start_disagg(tokenizer, tokenizer_dir, tmp_path_factory.mktemp("logs") / "router.log")
    try:
        wait_for(lambda: all(w["healthy"] for w in c.snapshot().values()), 5)
        yield c
    finally:
        stop_disagg(c)


@pytest.fixture
def disagg(shared: Disagg) -> Iterator[Disagg]:
    yield shared
    for w in shared.workers:
        w.mode, w.busy, w.waiting, w.draining, w.fail, w.fail_remote = "run", 0, 0, False, None, None
    wait_for(lambda: all(w["healthy"] and not w["draining"] for w in shared.snapshot().values()), 5)


@pytest.fixture
def own(tokenizer, tokenizer_dir, tmp_path) -> Iterator[Disagg]:
    """A cluster of its own, for tests that kill or restart workers."""
    c = start_disagg(tokenizer, tokenizer_dir, tmp_path / "router.log")
    try:
        wait_for(lambda: all(w["healthy"] for w in c.snapshot().values()), 5)
        yield c
    finally:
        stop_disagg(c)


def conversation(system: str, turns: int) -> list[list[dict]]:
    """The message lists of a session's turns: each adds a tool result and a question to the last."""
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Start the task."}]
    out = [list(msgs)]
    for t in range(1, turns):
        msgs += [{"role": "assistant", "content": f"step {t}"},
                 {"role": "user", "content": f"Tool output {t}: " + "data " * 40 + "What next?"}]
        out.append(list(msgs))
    return out


def test_requests_go_to_a_decode_worker_naming_its_prefill_worker(disagg: Disagg) -> None:
    r = disagg.chat(conversation("You route.", 1)[0])
    decode, prefill_url = disagg.where(r["id"])
    assert disagg.by_url(prefill_url) in disagg.prefill
    (req,) = [g for g in decode.generate_reqs() if g.rid == r["id"]]
    assert req.local_prefill_max_tokens == LOCAL_MAX
    assert not any(w.generate_reqs() for w in disagg.prefill)  # prefill workers never get GenerateReq
    snap = disagg.snapshot()
    assert {snap[w.address]["role"] for w in disagg.prefill} == {"prefill"}
    assert {snap[w.address]["role"] for w in disagg.decode} == {"decode"}
    assert snap[prefill_url]["precision"] == {"prefill": "nvfp4", "decode": "bf16"}
    assert snap[prefill_url]["prefills_assigned"] >= 1 and snap[decode.address]["routed"] >= 1


def test_session_turns_stay_on_one_pair_and_reuse_the_cache(disagg: Disagg, tokenizer: Tokenizer) -> None:
    turns = conversation("You are a coding agent. " * 8, 4)
    first = disagg.chat(turns[0], session="pair-1")
    decode, prefill_url = disagg.where(first["id"])
    decode.busy = 6  # the bound pair gets busy; the session stays anyway
    disagg.by_url(prefill_url).busy = 6
    wait_for(lambda: disagg.snapshot()[decode.address]["load"].get("running") == 6, 3)
    before = metric(disagg.router.base, "mixquant_router_placements", role="decode", kind="affinity")
    prev_len = len(tokenizer.encode_chat(turns[0]))
    for msgs in turns[1:]:
        r = disagg.chat(msgs, session="pair-1")
        assert disagg.where(r["id"]) == (decode, prefill_url)
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= prev_len // 16 * 16
        prev_len = r["usage"]["prompt_tokens"]
    after = metric(disagg.router.base, "mixquant_router_placements", role="decode", kind="affinity")
    assert after - before == 3
    snap = disagg.snapshot()
    assert snap[decode.address]["sessions"] >= 1 and snap[prefill_url]["sessions"] >= 1


def test_new_sessions_go_where_their_system_prompt_is_cached(disagg: Disagg, tokenizer: Tokenizer) -> None:
    system = "You are a release manager with a very long checklist. " * 6
    d1, p1 = disagg.decode[1], disagg.prefill[1]
    shared_prefix = tokenizer.encode_chat(conversation(system, 1)[0])
    d1.remember(shared_prefix)
    p1.remember(shared_prefix)
    d1.busy = p1.busy = 1  # a little busier than the others: the cache still wins
    wait_for(lambda: disagg.snapshot()[d1.address]["cached_pages_known"] >= len(shared_prefix) // 16
             and disagg.snapshot()[p1.address]["load"].get("running") == 1, 3)
    before = metric(disagg.router.base, "mixquant_router_placements", kind="prefix")
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Ship version 2."}]
    r = disagg.chat(msgs, session="cached-1")
    assert disagg.where(r["id"]) == (d1, p1.address)
    assert metric(disagg.router.base, "mixquant_router_placements", kind="prefix") - before == 2


def test_without_a_healthy_prefill_worker_the_decode_worker_prefills(disagg: Disagg) -> None:
    for w in disagg.prefill:
        w.mode = "silent"
    wait_for(lambda: not any(disagg.snapshot()[w.address]["healthy"] for w in disagg.prefill), 4)
    ready = httpx.get(disagg.router.base + "/health")  # decode workers still answer, but not as configured
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    before = metric(disagg.router.base, "mixquant_router_no_prefill_worker")
    r = disagg.chat(conversation("Alone.", 1)[0])
    assert disagg.where(r["id"])[1] is None
    assert metric(disagg.router.base, "mixquant_router_no_prefill_worker") - before == 1


def test_a_failed_kv_transfer_is_prefilled_by_the_decode_worker_instead(disagg: Disagg) -> None:
    for w in disagg.decode:
        w.fail_remote = Failure(0, "KV transfer failed: timed out after 30 s", "kv_transfer_failed")
    before = metric(disagg.router.base, "mixquant_router_retries")
    r = disagg.chat(conversation("Transfer trouble.", 1)[0], session="kv-fail-1")
    decode, prefill_url = disagg.where(r["id"])
    assert prefill_url is None and r["choices"][0]["message"]["content"]
    first = next(g for g in decode.generate_reqs() if g.rid == r["id"])
    assert first.prefill_url is not None  # the first attempt named a prefill worker
    assert metric(disagg.router.base, "mixquant_router_retries") - before == 1
    # a transfer that keeps failing without a prefill worker in the way is reported, as a 503
    for w in disagg.decode:
        w.fail = Failure(0, "KV transfer failed: broken", "kv_transfer_failed")
    body = {"model": "m", "messages": conversation("Still broken.", 1)[0], "max_tokens": 2}
    failed = httpx.post(disagg.router.base + "/v1/chat/completions", json=body, timeout=30)
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "kv_transfer_failed"


def test_draining_and_overloaded_workers_lose_their_sessions(disagg: Disagg) -> None:
    first = disagg.chat(conversation("Drain me.", 1)[0], session="drain-1")
    home, _ = disagg.where(first["id"])
    other = next(w for w in disagg.decode if w is not home)
    home.draining = True
    wait_for(lambda: disagg.snapshot()[home.address]["draining"], 3)
    before = metric(disagg.router.base, "mixquant_router_session_moves", reason="draining")
    assert disagg.where(disagg.chat(conversation("Drain me.", 2)[1], session="drain-1")["id"])[0] is other
    assert disagg.where(disagg.chat(conversation("Fresh.", 1)[0], session="fresh-1")["id"])[0] is other
    assert metric(disagg.router.base, "mixquant_router_session_moves", reason="draining") - before == 1
    home.draining = False
    other.waiting = 9  # more than --overload-threshold (4) requests wait there, none on `home`
    wait_for(lambda: disagg.snapshot()[other.address]["load"].get("waiting") == 9
             and not disagg.snapshot()[home.address]["draining"], 3)
    before = metric(disagg.router.base, "mixquant_router_session_moves", reason="overloaded")
    assert disagg.where(disagg.chat(conversation("Drain me.", 3)[2], session="drain-1")["id"])[0] is home
    assert metric(disagg.router.base, "mixquant_router_session_moves", reason="overloaded") - before == 1


def test_round_robin_alternates_both_sides_per_request(shared: Disagg, tokenizer_dir, tmp_path) -> None:
    flags = ["--policy", "round_robin", "--served-model-name", "m",
             "--prefill-urls", ",".join(w.address for w in shared.prefill),
             "--decode-urls", ",".join(w.address for w in shared.decode)]
    rr = RouterProcess(tokenizer_dir, [], tmp_path / "rr.log", *flags)
    try:
        rr.wait_ready()
        wait_for(lambda: all(w["healthy"] for w in httpx.get(rr.base + "/workers").json()), 5)
        view = Disagg(rr, shared.prefill, shared.decode)
        pairs = [shared.where(view.chat(msgs, session="rr-1")["id"]) for msgs in conversation("RR.", 4)]
        decodes = [d.worker_id for d, _ in pairs]
        prefills = [shared.by_url(p).worker_id for _, p in pairs]
        for side in (decodes, prefills):  # each side in turn: a b a b
            assert side[0] != side[1] and side[:2] == side[2:], side
        assert metric(rr.base, "mixquant_router_placements", kind="round_robin") == 8
        assert metric(rr.base, "mixquant_router_sessions") == 0
    finally:
        rr.stop()


def test_killing_the_bound_decode_worker_rebinds_and_the_next_turn_answers(own: Disagg) -> None:
    turns = conversation("Survive failures.", 3)
    home, prefill_url = own.where(own.chat(turns[0], session="kill-1")["id"])
    home.stop()
    r = own.chat(turns[1], session="kill-1")  # at once: the closed connection is noticed without a timeout
    other = next(w for w in own.decode if w is not home)
    assert own.where(r["id"]) == (other, prefill_url)  # the prefill worker, healthy, stays bound
    assert r["choices"][0]["finish_reason"] in ("stop", "length") and r["choices"][0]["message"]["content"]
    assert metric(own.router.base, "mixquant_router_session_moves", role="decode") == 1
    assert not own.snapshot()[home.address]["healthy"]
    assert own.where(own.chat(turns[2], session="kill-1")["id"])[0] is other


def test_a_request_in_flight_on_a_dead_worker_is_placed_again(own: Disagg) -> None:
    turns = conversation("Retry me.", 2)
    home, _ = own.where(own.chat(turns[0], session="retry-1")["id"])
    home.step_s = 0.3
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=own.chat(turns[1], session="retry-1", max_tokens=20)))
    t.start()
    wait_for(lambda: len(home.generate_reqs()) == 2, 5)
    home.stop()
    t.join(10)
    other = next(w for w in own.decode if w is not home)
    assert own.where(result["r"]["id"])[0] is other
    assert metric(own.router.base, "mixquant_router_retries") == 1


def test_a_restarted_worker_fails_what_it_lost_and_reports_its_cache_again(own: Disagg) -> None:
    turns = conversation("Restart me.", 2)
    home, _ = own.where(own.chat(turns[0], session="restart-1")["id"])
    url = home.address
    wait_for(lambda: own.snapshot()[url]["cached_pages_known"] > 0, 3)
    home.mode = "stall"
    result: dict = {}
    before = len(home.generate_reqs())
    t = threading.Thread(target=lambda: result.update(r=own.chat(turns[1], session="restart-1")))
    t.start()
    # the worker itself holds the new turn (the router's view of its load may still be the first turn's)
    wait_for(lambda: len(home.generate_reqs()) > before and len(home._running) == 1, 5)
    home.restart()  # ... and loses it
    home.mode = "run"
    t.join(10)
    assert result["r"]["choices"][0]["message"]["content"]  # placed again on the same, restarted worker
    assert own.where(result["r"]["id"])[0] is home and own.where(result["r"]["id"])[1] is not None
    assert [g.rid for g in home.generate_reqs()][-1] == result["r"]["id"] + "-r1"
    assert own.snapshot()[url]["restarts"] == 1
    wait_for(lambda: own.snapshot()[url]["cached_pages_known"] > 0, 3)  # the new instance's snapshot
    assert own.snapshot()[url]["info"]["instance_id"] == home.instance_id
