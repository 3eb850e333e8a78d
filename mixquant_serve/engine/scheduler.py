"""Continuous batching with chunked prefill, prefix reuse, admission control and preemption.

Queues: `waiting` (FIFO, not yet holding pages) -> `running` (holding pages; prefilling while
num_computed < prefill_target, then decoding) -> finished (pages released, full pages kept by the
radix cache). Each step is one phase: a prefill batch (new and continuing chunks, up to the token
budget), a tail batch (Mix-Quant's BF16 tail: the last prompt tokens of requests past their prefill
target, in chunks under the same budget, run in the decode precision) or a decode batch (one token for
every decoding request). When decode work and prompt work (tail or prefill) both exist the two
alternate, so long prompts do not stall running streams; tails go before new prefill. With mixing on
(`mix_phases`: the prompt phases that run in the decode precision) a prompt batch of such a phase also
carries one token of every decoding request (its last rows, `num_decode`), under the same token budget,
so decode streams advance with every chunk instead of waiting for it (SGLang's mixed chunk).

Disaggregation: a request whose KV a prefill worker computes (decode side, `remote_url`) gets pages
for its whole prompt at admission and then `awaiting_kv` until the transfer ends (kv_ready); a
prefill-only request (prefill side) is `parked` with its pages once computed, until its transfer ends.
Neither is preempted while pages of a transfer are in flight.

Pages: a request takes pages as its tokens need them. When the pool runs dry the radix cache evicts
unreferenced pages; if that is not enough, admission waits, and decode preempts the most recently
admitted request (its pages are released and it is recomputed later). No request is ever dropped
for lack of pages.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from mixquant_serve.engine.request import Request, Status
from mixquant_serve.kvcache.page_pool import PagePool
from mixquant_serve.kvcache.radix_cache import RadixCache


class Phase(Enum):
    PREFILL = "prefill"  # the prefill precision
    TAIL = "tail"  # the decode precision, several tokens per request (Mix-Quant's BF16 tail)
    DECODE = "decode"


@dataclass
class Batch:
    phase: Phase
    reqs: list[Request]
    lengths: list[int]  # new tokens each request computes this step
    sample: list[bool]  # whether each request samples a token after this step
    num_decode: int = 0  # the last rows of a prompt batch that are decode steps riding along (mixing)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_prompt_tokens(self) -> int:
        return self.num_tokens - self.num_decode


class _Members:
    """`req in scheduler.running` in O(1): a set of the running list, rebuilt only after a preemption (the one
    way a request leaves it while a batch is put together) or an admission."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched, self.key, self.set = sched, None, set()

    def __contains__(self, req: Request) -> bool:
        key = (self.sched.num_preemptions, len(self.sched.running))
        if key != self.key:
            self.key, self.set = key, set(self.sched.running)
        return req in self.set


class Scheduler:
    def __init__(self, pool: PagePool, cache: RadixCache | None, max_running: int, token_budget: int,
                 mix_phases: frozenset[Phase] = frozenset()) -> None:
        self.pool = pool
        self.cache = cache
        self.max_running = max_running
        self.token_budget = token_budget
        self.mix_phases = mix_phases
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.last_phase: Phase | None = None
        self.num_preemptions = 0
        self.num_tail_tokens = 0  # prompt tokens computed by tail batches
        self.parked: dict[str, Request] = {}
        self._prefilled: list[Request] = []
        self._remote: list[Request] = []

    # -- queue management -------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, rid: str) -> Request | None:
        """Take a request out of the scheduler (abort), releasing its pages."""
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                return req
        for req in self.running:
            if req.rid == rid:
                self.running.remove(req)
                self._release(req, cache_it=False)
                return req
        if (req := self.parked.pop(rid, None)) is not None:
            self._release(req, cache_it=False)
        return req

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req, cache_it=True)
        req.status = Status.FINISHED

    def release_parked(self, rid: str) -> None:
        """A prefill-only request's transfer ended: its pages go to the radix cache and are released."""
        if (req := self.parked.pop(rid, None)) is not None:
            self._release(req, cache_it=True)
            req.status = Status.FINISHED

    def take_prefilled(self) -> list[Request]:
        out, self._prefilled = self._prefilled, []
        return out

    def take_remote(self) -> list[Request]:
        out, self._remote = self._remote, []
        return out

    def kv_ready(self, req: Request) -> None:
        req.num_computed, req.awaiting_kv = req.prefill_target, False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def queued_tokens(self) -> int:
        """Tokens still to prefill, waiting and running."""
        return sum(r.prefill_target - r.num_computed for r in self.waiting) + sum(
            max(0, r.prefill_target - r.num_computed) for r in self.running)

    # -- batch selection --------------------------------------------------------------------------
    def next_batch(self) -> Batch | None:
        decoding = sum(r.decoding for r in self.running)
        # after a prompt batch that could not carry the decode rows, the decode rows go next
        last = self.last_phase
        decode_first = last in (Phase.PREFILL, Phase.TAIL) and last not in self.mix_phases and decoding
        # tails first; admission happens while making a prefill batch, and a request admitted with all but
        # its tail cached has no prefill to do, so look for tails again after it
        tail, prefill = (Phase.TAIL, self._tail_batch), (Phase.PREFILL, self._prefill_batch)
        decode = (Phase.DECODE, self._decode_batch)
        makers = (decode, tail, prefill, tail) if decode_first else (tail, prefill, tail, decode)
        for phase, make in makers:
            mix = decoding and phase is not Phase.DECODE and phase in self.mix_phases
            # leave room in the budget for the decode rows a mixed batch carries
            batch = make(max(1, self.token_budget - decoding)) if mix else make()
            if batch is not None:
                self.last_phase = batch.phase
                return self._with_decode_rows(batch) if mix else batch
        return None

    def _with_decode_rows(self, batch: Batch) -> Batch:
        """`batch` plus one token of every decoding request (its last rows), pages made for them first."""
        decode = self._decode_batch()
        if decode is None:
            return batch
        # making room for a decode row may have preempted a newer request of the prompt batch
        running = set(self.running)
        rows = [(r, n, s) for r, n, s in zip(batch.reqs, batch.lengths, batch.sample, strict=True) if r in running]
        if not rows:
            return decode
        reqs, lengths, sample = map(list, zip(*rows, strict=True))
        return Batch(batch.phase, reqs + decode.reqs, lengths + decode.lengths, sample + decode.sample,
                     num_decode=len(decode.reqs))

    def _prefill_batch(self, budget: int | None = None) -> Batch | None:
        budget = budget or self.token_budget
        reqs, lengths, running = [], [], _Members(self)
        for req in sorted((r for r in self.running if r.in_prefill and not r.awaiting_kv), key=lambda r: r.age):
            if budget <= 0:
                break
            if req not in running:  # preempted to make room for an older request
                continue
            n = self._grow(req, min(budget, req.prefill_target - req.num_computed))
            if n:
                reqs.append(req), lengths.append(n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            if not self._admit(req):
                break
            self.waiting.popleft()
            if not req.in_prefill or req.awaiting_kv:  # all from cache, or its KV comes from elsewhere
                continue
            n = self._grow(req, min(budget, req.prefill_target - req.num_computed))
            reqs.append(req), lengths.append(n)
            budget -= n
        # an old request re-admitted after preemption may have preempted newer ones picked above, and a
        # preempted one may have been re-admitted: its last entry is the one that counts
        running = set(self.running)
        picked = {r: n for r, n in zip(reqs, lengths, strict=True) if r in running}
        picked = {r: n for r, n in picked.items() if n > 0}
        if not picked:
            return None
        reqs, lengths = list(picked), list(picked.values())
        # a chunk that ends at the newest token yields the logits of the next one
        sample = [not r.prefill_only and r.num_computed + n == r.num_tokens
                  for r, n in zip(reqs, lengths, strict=True)]
        return Batch(Phase.PREFILL, reqs, lengths, sample)

    def _tail_batch(self, budget: int | None = None) -> Batch | None:
        """The BF16 tails, oldest first, in chunks under the token budget; a chunk that reaches the newest
        token samples (the first token then comes from the decode precision's logits)."""
        budget, picked, running = budget or self.token_budget, {}, _Members(self)
        for req in sorted((r for r in self.running if r.in_tail and not r.awaiting_kv), key=lambda r: r.age):
            if budget <= 0:
                break
            if req not in running:  # preempted to make room for an older request
                continue
            if (n := self._grow(req, min(budget, req.num_tokens - req.num_computed))) > 0:
                picked[req] = n
                budget -= n
        picked = {r: n for r, n in picked.items() if r in running}
        if not picked:
            return None
        sample = [r.num_computed + n == r.num_tokens for r, n in picked.items()]
        return Batch(Phase.TAIL, list(picked), list(picked.values()), sample)

    def _decode_batch(self) -> Batch | None:
        reqs, running = [], _Members(self)
        for req in sorted((r for r in self.running if r.decoding), key=lambda r: r.age):
            if req in running and self._make_room(req, req.num_tokens):
                reqs.append(req)
        reqs = [r for r in reqs if r in running]
        if not reqs:
            return None
        return Batch(Phase.DECODE, reqs, [1] * len(reqs), [True] * len(reqs))

    # -- pages ------------------------------------------------------------------------------------
    def _admit(self, req: Request) -> bool:
        """Reuse the cached prefix and move the request to running; False if no page is free for it."""
        if self.cache is not None and req.num_computed == 0 and req.prefix_reuse:
            # leave the newest token to compute: its step yields the logits of the next one
            usable = (req.num_tokens - 1) // self.pool.page_size
            pages = self.cache.match_prefix(req.token_ids[: usable * self.pool.page_size])
            self.pool.ref(pages)
            req.pages = pages
            req.num_computed = len(pages) * self.pool.page_size
        remote = req.remote_url is not None and req.prefill_target - req.num_computed >= max(
            1, req.local_prefill_max_tokens)
        first = req.num_tokens if remote or not req.in_prefill else req.num_computed + 1
        if not self._ensure_pages(req, first):
            self.pool.release(req.pages)
            req.pages, req.num_computed = [], 0
            return False
        if not req.admitted_once:
            req.cached_tokens = req.num_computed
            req.admitted_once = True
        if remote:
            req.awaiting_kv, req.kv_start = True, req.num_computed
            self._remote.append(req)
        req.status = Status.RUNNING
        self.running.append(req)
        return True

    def _grow(self, req: Request, n: int) -> int:
        """Make room for the next n tokens of req; under pressure, as many as its pages already hold."""
        if self._make_room(req, req.num_computed + n):
            return n
        return len(req.pages) * self.pool.page_size - req.num_computed

    def _make_room(self, req: Request, num_tokens: int) -> bool:
        """Pages for num_tokens of req, preempting newer requests if needed (the oldest always progresses)."""
        while not self._ensure_pages(req, num_tokens):
            newer = [r for r in self.running if r.age > req.age and not r.awaiting_kv]
            if not newer:
                return False
            self._preempt(max(newer, key=lambda r: r.age))
        return True

    def reserve_pages(self, req: Request, num_tokens: int) -> bool:
        """Pages for num_tokens of req from the free list or the radix cache, never by preempting."""
        return self._ensure_pages(req, num_tokens)

    def _ensure_pages(self, req: Request, num_tokens: int) -> bool:
        need = self.pool.pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        if self.pool.num_free < need and self.cache is not None:
            self.cache.evict(need - self.pool.num_free)
        pages = self.pool.alloc(need)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req, cache_it=True)
        req.reset_for_recompute()
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _release(self, req: Request, cache_it: bool) -> None:
        """Give back the request's pages; its full, computed pages go to the radix cache first."""
        if cache_it and self.cache is not None:
            full = min(req.num_computed, req.num_tokens) // self.pool.page_size
            if full:
                self.cache.insert(req.token_ids[: full * self.pool.page_size], req.pages[:full])
        self.pool.release(req.pages)
        req.pages = []

    # -- bookkeeping after a forward --------------------------------------------------------------
    def commit(self, batch: Batch) -> None:
        if batch.phase is Phase.TAIL:
            self.num_tail_tokens += batch.num_prompt_tokens
        for req, n in zip(batch.reqs, batch.lengths, strict=True):
            req.num_computed += n
            if req.prefill_only and not req.in_prefill:
                self.running.remove(req)
                self.parked[req.rid] = req
                self._prefilled.append(req)
