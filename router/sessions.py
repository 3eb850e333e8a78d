"""Sessions: which key a request belongs to, and the (prefill, decode) binding each key holds.

The key, first found wins: the request field `prompt_cache_key`, the header `X-Session-ID`, the header
`X-SMG-Routing-Key` (SGLang's gateway), the `user` field; otherwise a hash of how the conversation begins
(the messages up to and including the first user turn, or the first prompt tokens of a completion), so that
clients who send nothing still keep their turns together.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SESSION_HEADERS = ("x-session-id", "x-smg-routing-key")
COMPLETION_KEY_TOKENS = 32  # a completion prompt's first tokens that name its session (two 16-token pages)
MAX_SESSIONS = 100_000


def explicit_key(headers: Mapping[str, str], prompt_cache_key: str | None, user: str | None) -> str | None:
    if prompt_cache_key:
        return prompt_cache_key
    for name in SESSION_HEADERS:
        if value := headers.get(name):
            return value
    return user or None


def conversation_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """A hash of the system prompt(s) and the first user turn."""
    head = []
    for m in messages:
        head.append(m)
        if m.get("role") == "user":
            break
    return _digest(json.dumps(head, sort_keys=True, ensure_ascii=False, default=str).encode())


def prompt_key(tokens: Sequence[int]) -> str:
    return _digest(json.dumps(list(tokens[:COMPLETION_KEY_TOKENS])).encode())


def _digest(data: bytes) -> str:
    return "auto-" + hashlib.blake2b(data, digest_size=12).hexdigest()


@dataclass
class Binding:
    worker: str  # url of the colocated or decode worker that answers the session
    prefill: str | None  # url of the prefill worker paired with it (disaggregated serving)
    last_used: float
    requests: int = 0


class SessionTable:
    """Bindings in least-recently-used order; idle ones expire after `ttl` seconds (0: never)."""

    def __init__(self, ttl: float, capacity: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._items: OrderedDict[str, Binding] = OrderedDict()
        self.expired: Counter[str] = Counter()  # reason ("idle" | "capacity") -> bindings dropped

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, now: float | None = None) -> Binding | None:
        self.expire(time.monotonic() if now is None else now)
        return self._items.get(key)

    def bind(self, key: str, worker: str, prefill: str | None, now: float | None = None) -> Binding:
        now = time.monotonic() if now is None else now
        old = self._items.pop(key, None)
        b = Binding(worker, prefill, now, old.requests if old else 0)
        self._items[key] = b
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.expired["capacity"] += 1
        return b

    def touch(self, key: str, now: float | None = None) -> None:
        b = self._items.get(key)
        if b is not None:
            b.last_used = time.monotonic() if now is None else now
            b.requests += 1
            self._items.move_to_end(key)

    def expire(self, now: float) -> int:
        if self.ttl <= 0:
            return 0
        n = 0
        while self._items:
            key, b = next(iter(self._items.items()))
            if now - b.last_used <= self.ttl:
                break
            del self._items[key]
            n += 1
        self.expired["idle"] += n
        return n

    def per_worker(self) -> Counter[str]:
        """url -> sessions bound to it (as the answering worker or as the prefill worker)."""
        counts: Counter[str] = Counter()
        for b in self._items.values():
            counts[b.worker] += 1
            if b.prefill:
                counts[b.prefill] += 1
        return counts
