"""Prometheus metrics of the router, and per-worker gauges rebuilt from each worker's latest heartbeat.

Placement is counted by role and kind (`affinity`: a session's bound worker; `prefix`: a new binding where
the prompt's prefix was cached; `least_loaded`; `round_robin`), binding moves by role and reason
(`unhealthy`, `draining`, `overloaded`, `gone`), expired bindings by reason (`idle`, `capacity`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mixquant_serve.protocol.messages import WorkerStats
from router.placement import PlacementPolicy, Target
from router.workers import WorkerPool

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/health/ready", "/health/live",
             "/workers", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
WORKER_GAUGES = ("num_running", "num_waiting", "queued_tokens", "free_pages", "total_pages", "cached_pages")
PREFIX = "mixquant_router_"
NO_PREFILL_LOG_EVERY_S = 10.0  # the warning about prefills without a prefill worker, at most this often

log = logging.getLogger("router.metrics")
_RESERVED = {*WORKER_GAUGES, "healthy"}  # worker counters with these names get a "counter_" prefix


def sanitize(name: str) -> str:
    """A counter name as the tail of a Prometheus metric name (which the prefix starts legally)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name) or "_"


class WorkerCollector(Collector):
    """One gauge family per WorkerStats field and per `counters`/`gauges` entry, labelled by worker."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["worker", "url", "role"]
        healthy = GaugeMetricFamily("mixquant_worker_healthy", "1 if the worker is healthy", labels=labels)
        routed = CounterMetricFamily(PREFIX + "worker_requests", "GenerateReqs the router sent to a worker "
                                     "(as=serving) or that named it as prefill worker (as=prefill)",
                                     labels=[*labels, "as"])
        info = GaugeMetricFamily("mixquant_worker_info", "1 per worker, labelled with the precision each phase "
                                 "runs in, its BF16 tail (prompt tokens at the end run in the decode precision) and "
                                 "whether prefill computes its K/V projections in the decode precision",
                                 labels=[*labels, "prefill_precision", "decode_precision", "bf16_tail_tokens",
                                         "bf16_kv_proj"])
        families: dict[str, GaugeMetricFamily] = {}
        for link in self.pool.links:
            label_values = [link.worker_id, link.url, link.role]
            healthy.add_metric(label_values, 1.0 if link.healthy else 0.0)
            if link.info is not None:
                info.add_metric([*label_values, link.info.prefill_precision, link.info.decode_precision,
                                 str(link.info.bf16_tail_tokens), str(link.info.bf16_kv_proj).lower()], 1.0)
            routed.add_metric([*label_values, "serving"], float(link.routed))
            routed.add_metric([*label_values, "prefill"], float(link.prefills_assigned))
            if link.stats is None:
                continue
            for name, value in _worker_values(link.stats).items():
                fam = families.get(name)
                if fam is None:
                    kind = "gauge" if name in WORKER_GAUGES else "value"
                    doc = f"worker {kind} {name} (latest heartbeat)"
                    fam = families[name] = GaugeMetricFamily(f"mixquant_worker_{name}", doc, labels=labels)
                fam.add_metric(label_values, value)
        yield healthy
        yield info
        yield routed
        yield from families.values()


def _worker_values(stats: WorkerStats) -> dict[str, float]:
    values = {f: float(getattr(stats, f)) for f in WORKER_GAUGES}
    for name, value in (*stats.counters.items(), *stats.gauges.items()):
        clean = sanitize(name)
        values["counter_" + clean if clean in _RESERVED else clean] = float(value)
    return values


class SessionCollector(Collector):
    def __init__(self, policy: PlacementPolicy) -> None:
        self.policy = policy

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        table = self.policy.sessions
        bound = GaugeMetricFamily(PREFIX + "sessions", "sessions bound to workers")
        bound.add_metric([], float(len(table) if table is not None else 0))
        expired = CounterMetricFamily(PREFIX + "session_expiries", "session bindings dropped",
                                      labels=["reason"])
        for reason in ("idle", "capacity"):
            expired.add_metric([reason], float(table.expired[reason] if table is not None else 0))
        yield bound
        yield expired


class RouterMetrics:
    def __init__(self, pool: WorkerPool, policy: PlacementPolicy) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "time to the first generated token",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "request latency, arrival to last byte",
                             ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "time between generated tokens",
                             ["endpoint"], buckets=ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens", registry=r)
        self.cached_tokens = Counter(PREFIX + "cached_tokens", "prompt tokens served from cache", registry=r)
        self.completion_tokens = Counter(PREFIX + "completion_tokens", "generated tokens", registry=r)
        self.inflight = Gauge(PREFIX + "inflight_requests", "generation requests in flight", registry=r)
        self.placements = Counter(PREFIX + "placements", "placement choices by worker role and kind",
                                  ["role", "kind"], registry=r)
        self.moves = Counter(PREFIX + "session_moves", "session bindings moved, by worker role and reason",
                             ["role", "reason"], registry=r)
        self.no_prefill = Counter(PREFIX + "no_prefill_worker", "requests a decode worker had to prefill "
                                  "entirely itself because no prefill worker was healthy", registry=r)
        self._no_prefill_unlogged = 0
        self._no_prefill_logged_at = -NO_PREFILL_LOG_EVERY_S
        self.retries = Counter(PREFIX + "retries", "requests placed again after their worker failed before "
                               "answering", registry=r)
        r.register(WorkerCollector(pool))
        r.register(SessionCollector(policy))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        if endpoint in ENDPOINTS[:2] and status == 200:
            self.e2e.labels(endpoint).observe(seconds)

    def on_placement(self, target: Target) -> None:
        for role, kind in target.decisions:
            self.placements.labels(role, kind).inc()
        for role, reason in target.moves:
            self.moves.labels(role, reason).inc()
        if target.worker.role == "decode" and target.prefill is None:
            self.no_prefill.inc()
            self._log_no_prefill(target)

    def _log_no_prefill(self, target: Target) -> None:
        """A warning (throttled, with how many it stands for) that a decode worker prefills a whole prompt."""
        self._no_prefill_unlogged += 1
        now = time.monotonic()
        if now - self._no_prefill_logged_at < NO_PREFILL_LOG_EVERY_S:
            return
        info = target.worker.info
        precision = info.decode_precision if info else "its decode precision"
        log.warning("no healthy prefill worker: decode worker %s prefills whole prompts itself in %s "
                    "(%d request(s) since the last such message; counted in mixquant_router_no_prefill_worker)",
                    target.worker.worker_id, precision, self._no_prefill_unlogged)
        self._no_prefill_unlogged, self._no_prefill_logged_at = 0, now

    def timer(self, endpoint: str) -> TokenTimer:
        return TokenTimer(self, endpoint)


class TokenTimer:
    """Times one request's tokens: the first one (TTFT) and the gaps between later ones (ITL)."""

    def __init__(self, metrics: RouterMetrics, endpoint: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.start = time.perf_counter()
        self.last: dict[str, float] = {}  # rid -> when its latest tokens came

    def on_tokens(self, rid: str, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if not self.last:
            self.metrics.ttft.labels(self.endpoint).observe(now - self.start)
        last = self.last.get(rid)
        if last is not None:
            self.metrics.itl.labels(self.endpoint).observe((now - last) / count)
        self.last[rid] = now

    def on_usage(self, prompt: int, cached: int, completion: int) -> None:
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.cached_tokens.inc(cached)
        self.metrics.completion_tokens.inc(completion)
