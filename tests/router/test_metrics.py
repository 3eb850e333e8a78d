"""Per-worker gauges rebuilt from heartbeats (labels, sanitized names, no collisions); session metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mixquant_serve.protocol.messages import WorkerStats
from router.metrics import SessionCollector, WorkerCollector
from router.placement import PolicySettings, create_policy


@dataclass
class FakeLink:
    worker_id: str
    url: str
    healthy: bool
    stats: WorkerStats | None
    role: str = "decode"
    routed: int = 3
    prefills_assigned: int = 0
    info: object | None = None


@dataclass
class FakePool:
    links: list[FakeLink]


def test_worker_gauges() -> None:
    counters = {"prefill.tokens": 12.0, "num_running": 99.0, "healthy": 7.0, "9 lives": 9.0}
    stats = WorkerStats(worker_id="a", instance_id="i", num_running=2, num_waiting=1, queued_tokens=30,
                        free_pages=5, total_pages=8, cached_pages=3, counters=counters,
                        gauges={"awaiting kv": 4.0})
    silent = FakeLink("tcp://h:2", "tcp://h:2", False, None)  # never answered: named by its url
    pool = FakePool([FakeLink("a", "tcp://h:1", True, stats), silent])
    registry = CollectorRegistry()
    registry.register(WorkerCollector(pool))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}

    def sample(name: str, worker: str = "a") -> float:
        (s,) = [s for s in fams[name].samples if s.labels["worker"] == worker]
        return s.value

    assert sample("mixquant_worker_healthy") == 1 and sample("mixquant_worker_healthy", "tcp://h:2") == 0
    assert sample("mixquant_worker_num_running") == 2 and sample("mixquant_worker_queued_tokens") == 30
    assert sample("mixquant_worker_prefill_tokens") == 12
    assert sample("mixquant_worker_counter_num_running") == 99
    assert sample("mixquant_worker_counter_healthy") == 7
    assert sample("mixquant_worker_9_lives") == 9
    assert sample("mixquant_worker_awaiting_kv") == 4
    assert fams["mixquant_worker_free_pages"].samples[0].labels == {"worker": "a", "url": "tcp://h:1",
                                                                    "role": "decode"}
    routed = {(s.labels["worker"], s.labels["as"]): s.value
              for s in fams["mixquant_router_worker_requests"].samples}
    assert routed[("a", "serving")] == 3 and routed[("a", "prefill")] == 0
    assert "mixquant_worker_info" in fams and not fams["mixquant_worker_info"].samples  # no WorkerInfo yet


def test_worker_info_names_each_phase_precision() -> None:
    from types import SimpleNamespace

    link = FakeLink("a", "tcp://h:1", True, None, role="prefill",
                    info=SimpleNamespace(prefill_precision="nvfp4", decode_precision="nvfp4",
                                         bf16_tail_tokens=64, bf16_kv_proj=True))
    registry = CollectorRegistry()
    registry.register(WorkerCollector(FakePool([link])))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    (s,) = fams["mixquant_worker_info"].samples
    assert s.value == 1 and s.labels["prefill_precision"] == "nvfp4" and s.labels["role"] == "prefill"
    assert s.labels["bf16_tail_tokens"] == "64" and s.labels["bf16_kv_proj"] == "true"


def test_session_metrics(monkeypatch) -> None:
    policy = create_policy("affinity", PolicySettings(session_ttl=5))
    clock = [0.0]
    monkeypatch.setattr("router.sessions.time.monotonic", lambda: clock[0])
    for key in ("x", "y"):
        policy.sessions.bind(key, "tcp://h:1", None)
    registry = CollectorRegistry()
    registry.register(SessionCollector(policy))

    def values() -> dict[str, float]:
        fams = text_string_to_metric_families(generate_latest(registry).decode())
        return {f"{s.name}{s.labels.get('reason', '')}": s.value for f in fams for s in f.samples}

    idle = "mixquant_router_session_expiries_totalidle"
    assert values()["mixquant_router_sessions"] == 2 and values()[idle] == 0
    clock[0] = 6.0
    policy.sessions.expire(clock[0])
    assert values()["mixquant_router_sessions"] == 0 and values()[idle] == 2
