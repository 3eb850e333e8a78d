"""What each worker's prefix cache holds, as the router knows it: chained page hashes (protocol.block_hash).

A worker reports its cache as CacheEvents: a snapshot after each Hello, then what it inserted and evicted.
Between a dispatch and the report that follows it (up to a heartbeat later), the pages of the prompt the
router just sent are counted as cached for PENDING_S seconds, so that a burst of sessions sharing a
system prompt already sees where it went.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mixquant_serve.protocol.block_hash import chain_hashes
from mixquant_serve.protocol.messages import CacheEvents

PENDING_S = 10.0


class PromptHashes:
    """A prompt's chained page hashes, computed once per page size."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = tokens
        self._by_size: dict[int, list[int]] = {}

    def get(self, page_size: int) -> list[int]:
        if page_size not in self._by_size:
            self._by_size[page_size] = chain_hashes(self.tokens, page_size)
        return self._by_size[page_size]


class CacheIndex:
    def __init__(self) -> None:
        self.page_size: int | None = None
        self.confirmed: set[int] = set()
        self.pending: dict[int, float] = {}  # hash -> when the guess expires

    def __len__(self) -> int:
        return len(self.confirmed)

    def clear(self) -> None:
        self.confirmed.clear()
        self.pending.clear()

    def apply(self, ev: CacheEvents) -> None:
        if ev.snapshot or ev.page_size != self.page_size:
            self.page_size = ev.page_size
            self.clear()
        self.confirmed.update(ev.inserted)
        self.confirmed.difference_update(ev.evicted)
        for h in (*ev.inserted, *ev.evicted):
            self.pending.pop(h, None)

    def expect(self, prompt: PromptHashes, now: float | None = None) -> None:
        """The worker is about to cache this prompt's full pages."""
        if self.page_size is None:
            return
        now = time.monotonic() if now is None else now
        if len(self.pending) > 100_000:
            self.pending = {h: t for h, t in self.pending.items() if t > now}
        for h in prompt.get(self.page_size):
            if h not in self.confirmed:
                self.pending[h] = now + PENDING_S

    def cached_tokens(self, prompt: PromptHashes, now: float | None = None) -> int:
        """Tokens of the prompt's longest cached prefix (whole pages) on this worker."""
        if self.page_size is None:
            return 0
        now = time.monotonic() if now is None else now
        n = 0
        for h in prompt.get(self.page_size):
            if h not in self.confirmed and self.pending.get(h, 0.0) <= now:
                break
            n += 1
        return n * self.page_size
