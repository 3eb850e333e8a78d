"""Placement policies on plain link objects: affinity, prefix placement, overload moves, round robin."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mixquant_serve.protocol.block_hash import chain_hashes
from mixquant_serve.protocol.messages import CacheEvents, WorkerStats
from router.cache_index import CacheIndex, PromptHashes
from router.errors import APIError
from router.placement import (
    Affinity,
    LeastLoaded,
    PlacementRequest,
    PolicySettings,
    RoundRobin,
    create_policy,
)

PAGE = 16
SYSTEM = list(range(1000, 1064))  # four pages shared by sessions


@dataclass
class FakeLink:
    url: str
    role: str = "colocated"
    stats: WorkerStats | None = None
    healthy: bool = True
    draining: bool = False
    inflight: dict = field(default_factory=dict)
    prefilling: set = field(default_factory=set)
    cache: CacheIndex = field(default_factory=CacheIndex)

    def __post_init__(self) -> None:
        self.cache.apply(CacheEvents(worker_id=self.url, page_size=PAGE, snapshot=True))
        self.load(0, 0, 0)

    @property
    def assigned(self) -> int:
        return len(self.inflight) + len(self.prefilling)

    def load(self, running: int, waiting: int, queued: int, free: int = 64) -> FakeLink:
        self.stats = WorkerStats(worker_id=self.url, instance_id="i", num_running=running,
                                 num_waiting=waiting, queued_tokens=queued, free_pages=free, total_pages=64,
                                 cached_pages=0)
        return self

    def caches(self, tokens: list[int]) -> FakeLink:
        self.cache.apply(CacheEvents(worker_id=self.url, page_size=PAGE, inserted=chain_hashes(tokens, PAGE)))
        return self


@dataclass
class FakePool:
    links: list[FakeLink]

    def eligible(self, roles: tuple[str, ...]) -> list[FakeLink]:
        return [w for w in self.links if w.healthy and not w.draining and w.role in roles]

    def get(self, url: str | None) -> FakeLink | None:
        return next((w for w in self.links if w.url == url), None)


def ask(policy, pool: FakePool, tokens: list[int], session: str | None = "s"):
    return policy.choose(pool, PlacementRequest("r", tokens, 1, session), PromptHashes(tokens))


def disagg(n: int = 2) -> FakePool:
    return FakePool([FakeLink(f"p{i}", "prefill") for i in range(n)] + [FakeLink(f"d{i}", "decode")
                                                                        for i in range(n)])


def test_least_loaded_order_requests_then_queued_tokens_then_free_pages() -> None:
    a, b, c = FakeLink("a").load(3, 1, 10), FakeLink("b").load(2, 0, 900), FakeLink("c").load(1, 1, 50)
    pool = FakePool([a, b, c])
    assert ask(LeastLoaded(PolicySettings()), pool, [1]).worker is c
    b.load(1, 0, 900)
    assert ask(LeastLoaded(PolicySettings()), pool, [1]).worker is b
    b.load(1, 1, 50, free=10)
    c.load(1, 1, 50, free=20)
    assert ask(LeastLoaded(PolicySettings()), pool, [1]).worker is c


def test_router_side_assignments_count_between_heartbeats() -> None:
    a, b = FakeLink("a"), FakeLink("b").load(1, 0, 0)
    pool = FakePool([a, b])
    assert ask(LeastLoaded(PolicySettings()), pool, [1]).worker is a
    a.inflight = {"x": 1, "y": 2}
    assert ask(LeastLoaded(PolicySettings()), pool, [1]).worker is b


def test_affinity_keeps_a_session_on_its_pair_whatever_the_load() -> None:
    pool = disagg()
    policy = Affinity(PolicySettings())
    first = ask(policy, pool, SYSTEM + [1, 2, 3])
    assert first.worker.role == "decode" and first.prefill.role == "prefill"
    assert sorted(first.decisions) == [("decode", "least_loaded"), ("prefill", "least_loaded")]
    first.worker.load(3, 0, 5000)  # busier, but not overloaded: the session stays
    first.prefill.load(3, 0, 5000)
    for turn in range(3):
        t = ask(policy, pool, SYSTEM + [1, 2, 3] + list(range(turn * 40)))
        assert (t.worker, t.prefill) == (first.worker, first.prefill)
        assert sorted(t.decisions) == [("decode", "affinity"), ("prefill", "affinity")] and not t.moves
    assert len(policy.sessions) == 1
    assert policy.sessions.per_worker() == {first.worker.url: 1, first.prefill.url: 1}


def test_new_sessions_go_where_their_prefix_is_cached() -> None:
    pool = disagg()
    d1, p0 = pool.get("d1"), pool.get("p0")
    d1.caches(SYSTEM)
    p0.caches(SYSTEM)
    d1.load(1, 0, 100)  # busier than d0, within the balance margin
    t = ask(Affinity(PolicySettings(balance_margin=2)), pool, SYSTEM + [7, 8, 9], "new")
    assert (t.worker, t.prefill) == (d1, p0)
    assert sorted(t.decisions) == [("decode", "prefix"), ("prefill", "prefix")]
    # the longest cached prefix wins over a shorter one
    pool.get("d0").caches(SYSTEM[:PAGE])
    assert ask(Affinity(PolicySettings()), pool, SYSTEM + [7], "other").worker is d1


def test_prefix_placement_yields_to_balance() -> None:
    pool = disagg()
    d0, d1 = pool.get("d0"), pool.get("d1")
    d0.caches(SYSTEM)
    d0.load(4, 0, 0)
    t = ask(Affinity(PolicySettings(balance_margin=2)), pool, SYSTEM + [5], "x")
    assert t.worker is d1 and ("decode", "least_loaded") in t.decisions


def test_a_burst_of_sessions_sharing_a_prompt_spreads_out() -> None:
    """Dispatches count as cached at once (pending) and as load (in flight): sessions fill both pairs."""
    pool = disagg()
    policy = Affinity(PolicySettings(balance_margin=1))
    placed = []
    for i in range(6):
        t = ask(policy, pool, SYSTEM + [i], f"s{i}")
        t.worker.cache.expect(PromptHashes(SYSTEM + [i]))
        t.worker.inflight[f"r{i}"] = object()
        placed.append(t.worker.url)
    assert placed.count("d0") == 3 and placed.count("d1") == 3
    assert placed[:2] == ["d0", "d0"]  # the second session joins the first one's cached prompt


def test_binding_moves_when_unhealthy_draining_or_overloaded_only() -> None:
    pool = disagg()
    policy = Affinity(PolicySettings(overload_threshold=4))
    t0 = ask(policy, pool, SYSTEM)
    d, other = t0.worker, next(w for w in pool.eligible(("decode",)) if w is not t0.worker)
    d.load(8, 4, 0)  # waiting == threshold: not overloaded
    assert ask(policy, pool, SYSTEM).worker is d
    d.load(8, 5, 0)
    moved = ask(policy, pool, SYSTEM)
    assert moved.worker is other and moved.moves == [("decode", "overloaded")]
    other.draining = True
    back = ask(policy, pool, SYSTEM)
    assert back.worker is d and back.moves == [("decode", "draining")]  # d is the only one left
    other.draining = False
    d.healthy = False
    t = ask(policy, pool, SYSTEM)
    assert t.worker is other and t.moves == [("decode", "unhealthy")] and t.prefill is t0.prefill
    t0.prefill.healthy = False
    t = ask(policy, pool, SYSTEM)
    assert t.worker is other and t.moves == [("prefill", "unhealthy")] and t.prefill is not t0.prefill


def test_overload_needs_a_less_loaded_peer() -> None:
    pool = disagg()
    policy = Affinity(PolicySettings(overload_threshold=1))
    d = ask(policy, pool, SYSTEM).worker
    for w in pool.eligible(("decode",)):
        w.load(4, 9, 0)
    assert ask(policy, pool, SYSTEM).worker is d  # everyone is swamped: moving would not help


def test_no_prefill_worker_leaves_prefill_to_the_decode_worker() -> None:
    pool = disagg()
    for w in pool.eligible(("prefill",)):
        w.healthy = False
    policy = Affinity(PolicySettings())
    t = ask(policy, pool, SYSTEM)
    assert t.worker.role == "decode" and t.prefill is None
    pool.get("p1").healthy = True
    assert ask(policy, pool, SYSTEM).prefill is pool.get("p1")


def test_no_serving_worker_is_503() -> None:
    pool = FakePool([FakeLink("p0", "prefill"), FakeLink("d0", "decode", healthy=False)])
    for policy in (Affinity(PolicySettings()), RoundRobin(PolicySettings()), LeastLoaded(PolicySettings())):
        with pytest.raises(APIError) as e:
            ask(policy, pool, SYSTEM)
        assert e.value.status == 503 and e.value.code == "no_healthy_worker"


def test_round_robin_chooses_each_side_in_turn_without_affinity() -> None:
    pool = disagg()
    pool.get("d0").caches(SYSTEM)
    rr = RoundRobin(PolicySettings())
    pairs = [(t.prefill.url, t.worker.url) for t in (ask(rr, pool, SYSTEM, "same") for _ in range(4))]
    assert pairs == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]
    assert rr.sessions is None


def test_sessions_expire_after_ttl(monkeypatch) -> None:
    pool = disagg()
    policy = Affinity(PolicySettings(session_ttl=10))
    clock = [1000.0]
    monkeypatch.setattr("router.placement.time.monotonic", lambda: clock[0])
    first = ask(policy, pool, [1, 2, 3]).worker
    first.load(1, 0, 0)
    clock[0] += 9
    assert ask(policy, pool, [1, 2, 3]).worker is first  # used again: the idle clock restarts
    clock[0] += 10.5
    assert policy.sessions.get("s", clock[0]) is None and policy.sessions.expired["idle"] == 1
    assert ask(policy, pool, [1, 2, 3]).worker is not first  # placed afresh, on the idle worker


def test_registry() -> None:
    assert isinstance(create_policy("affinity"), Affinity)
    assert isinstance(create_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="affinity"):
        create_policy("random")
