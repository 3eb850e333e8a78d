"""Placement: which worker answers a request and, for a decode worker, which prefill worker feeds it.

A policy is a class in POLICIES, built by name with `create_policy`:
- `affinity` (default): a session is bound to one serving worker (colocated, or decode plus its prefill
  worker) and stays there; a new session goes to the worker caching the longest prefix of its prompt
  (while that worker is not busier than the least loaded by more than `balance_margin` requests), else to
  the least loaded. A binding moves only when its worker is gone, unhealthy, draining, or overloaded (more
  than `overload_threshold` requests waiting on it while another worker of its role waits less); the new
  worker simply prefills what it lacks. Bindings expire after `session_ttl` idle seconds.
- `round_robin`: the Mix-Quant reference proxy's baseline: prefill and decode workers chosen
  independently, in turn, per request; no affinity; each prefill worker reuses its own prefix cache, and
  the whole prompt's KV is transferred to the decode worker every turn.
- `least_loaded`: per request, the least loaded of each role; no affinity.
Load, least first: requests on the worker (running + waiting as reported, or what the router has handed it
if more), queued prompt tokens, then the most free KV pages.
Every choice is reported in Target.decisions and Target.moves, which /metrics counts.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from router.cache_index import PromptHashes
from router.errors import APIError
from router.sessions import Binding, SessionTable

if TYPE_CHECKING:
    from router.workers import WorkerLink

SERVING_ROLES = ("colocated", "decode")


@dataclass(frozen=True)
class PlacementRequest:
    rid: str
    input_ids: Sequence[int]
    num_choices: int = 1
    session_id: str | None = None


@dataclass(frozen=True)
class PolicySettings:
    session_ttl: float = 600.0
    overload_threshold: int = 4
    balance_margin: int = 2


@dataclass
class Target:
    worker: WorkerLink  # receives the GenerateReq: a colocated or a decode worker
    prefill: WorkerLink | None = None  # the decode worker's prefill worker (None: it prefills everything)
    decisions: list[tuple[str, str]] = field(default_factory=list)  # (role, kind) of each choice made
    moves: list[tuple[str, str]] = field(default_factory=list)  # (role, reason) of each binding moved
    decode_prefix_reuse: bool = True  # False: the decode worker takes the whole prompt's KV every turn


class Pool(Protocol):
    def eligible(self, roles: tuple[str, ...]) -> list[WorkerLink]: ...

    def get(self, url: str | None) -> WorkerLink | None: ...


def requests(link: WorkerLink) -> int:
    s = link.stats
    return max(s.num_running + s.num_waiting if s else 0, link.assigned)


def load_key(link: WorkerLink) -> tuple[int, int, int]:
    s = link.stats
    return requests(link), s.queued_tokens if s else 0, -(s.free_pages if s else 0)


def waiting(link: WorkerLink) -> int:
    return link.stats.num_waiting if link.stats else 0


class PlacementPolicy(ABC):
    sessions: SessionTable | None = None

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings

    @abstractmethod
    def choose(self, pool: Pool, req: PlacementRequest, prompt: PromptHashes) -> Target:
        """Pick the workers of one request; raises a 503 APIError when no worker can answer."""

    def overloaded(self, link: WorkerLink, peers: Sequence[WorkerLink]) -> bool:
        mine = waiting(link)
        return mine > self.settings.overload_threshold and any(waiting(p) < mine for p in peers)


def serving_workers(pool: Pool) -> list[WorkerLink]:
    workers = pool.eligible(SERVING_ROLES)
    if not workers:
        raise APIError(503, "no healthy worker is available; try again later", code="no_healthy_worker")
    return workers


class LeastLoaded(PlacementPolicy):
    def choose(self, pool: Pool, req: PlacementRequest, prompt: PromptHashes) -> Target:
        worker = min(serving_workers(pool), key=load_key)
        target = Target(worker, decisions=[(worker.role, "least_loaded")])
        prefills = pool.eligible(("prefill",)) if worker.role == "decode" else []
        if prefills:
            target.prefill = min(prefills, key=load_key)
            target.decisions.append(("prefill", "least_loaded"))
        return target


class RoundRobin(PlacementPolicy):
    def __init__(self, settings: PolicySettings) -> None:
        super().__init__(settings)
        self.turns = {"serving": itertools.count(), "prefill": itertools.count()}

    def _next(self, workers: list[WorkerLink], side: str) -> WorkerLink:
        workers = sorted(workers, key=lambda w: w.url)
        return workers[next(self.turns[side]) % len(workers)]

    def choose(self, pool: Pool, req: PlacementRequest, prompt: PromptHashes) -> Target:
        worker = self._next(serving_workers(pool), "serving")
        target = Target(worker, decisions=[(worker.role, "round_robin")], decode_prefix_reuse=False)
        prefills = pool.eligible(("prefill",)) if worker.role == "decode" else []
        if prefills:
            target.prefill = self._next(prefills, "prefill")
            target.decisions.append(("prefill", "round_robin"))
        return target


class Affinity(PlacementPolicy):
    def __init__(self, settings: PolicySettings) -> None:
        super().__init__(settings)
        self.sessions = SessionTable(settings.session_ttl)

    def choose(self, pool: Pool, req: PlacementRequest, prompt: PromptHashes) -> Target:
        now = time.monotonic()
        bound = self.sessions.get(req.session_id, now) if req.session_id else None
        serving = serving_workers(pool)
        target = Target(serving[0])
        target.worker = self._keep_or_place(target, pool, bound.worker if bound else None, serving, prompt)
        prefills = pool.eligible(("prefill",)) if target.worker.role == "decode" else []
        if prefills:
            target.prefill = self._keep_or_place(target, pool, bound.prefill if bound else None, prefills,
                                                 prompt)
        if req.session_id:
            self._rebind(req.session_id, bound, target, now)
        return target

    def _keep_or_place(self, target: Target, pool: Pool, bound_url: str | None, candidates: list[WorkerLink],
                       prompt: PromptHashes) -> WorkerLink:
        """The bound worker if it may stay, else a new one; the choice is noted in `target`."""
        if bound_url is not None:
            kept = pool.get(bound_url)
            reason = self._why_leave(kept, candidates)
            if kept is not None and reason is None:
                target.decisions.append((kept.role, "affinity"))
                return kept
            target.moves.append((kept.role if kept else candidates[0].role, reason or "gone"))
        chosen, kind = self.place(candidates, prompt)
        target.decisions.append((chosen.role, kind))
        return chosen

    def _why_leave(self, link: WorkerLink | None, candidates: list[WorkerLink]) -> str | None:
        if link is None:
            return "gone"
        if link not in candidates:
            return "draining" if link.healthy and link.draining else "unhealthy"
        return "overloaded" if self.overloaded(link, candidates) else None

    def place(self, candidates: list[WorkerLink], prompt: PromptHashes) -> tuple[WorkerLink, str]:
        """A new binding: the longest cached prefix unless that worker is too busy, else the least loaded."""
        calm = [c for c in candidates if not self.overloaded(c, candidates)] or candidates
        least = min(calm, key=load_key)
        cached = {c.url: c.cache.cached_tokens(prompt) for c in calm}
        most = max(cached.values())
        if most > 0:
            best = min((c for c in calm if cached[c.url] == most), key=load_key)
            if requests(best) - requests(least) <= self.settings.balance_margin:
                return best, "prefix"
        return least, "least_loaded"

    def _rebind(self, key: str, bound: Binding | None, target: Target, now: float) -> None:
        prefill = target.prefill.url if target.prefill else (bound.prefill if bound else None)
        if bound is None or bound.worker != target.worker.url or bound.prefill != prefill:
            self.sessions.bind(key, target.worker.url, prefill, now)
        self.sessions.touch(key, now)


POLICIES: dict[str, type[PlacementPolicy]] = {
    "affinity": Affinity,
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
}


def create_policy(name: str, settings: PolicySettings | None = None) -> PlacementPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}; known: {sorted(POLICIES)}") from None
    return cls(settings or PolicySettings())
