"""RadixCache: page-granular match/insert/split, LRU eviction, listener events, and a randomized
comparison against a naive model (a dict of cached page-aligned prefixes) with refcount invariants."""

from __future__ import annotations

import random

import pytest

from mixquant_serve.kvcache.page_pool import PagePool
from mixquant_serve.kvcache.radix_cache import RadixCache

PS = 4
A, B, C, D = ([k] * PS for k in (1, 2, 3, 4))  # one page of tokens each


def make(num_pages: int = 33) -> tuple[PagePool, RadixCache, list]:
    events: list = []
    pool = PagePool(num_pages, PS)
    cache = RadixCache(pool, listener=lambda kind, toks, n: events.append((kind, list(toks))))
    return pool, cache, events


def compute(pool: PagePool, cache: RadixCache, tokens: list[int]) -> list[int]:
    """What a request does: reuse the cached prefix, compute the rest into new pages, insert, release."""
    full = len(tokens) // PS
    pages = cache.match_prefix(tokens)
    pool.ref(pages)
    pages += pool.alloc(full - len(pages))
    cache.insert(tokens[: full * PS], pages)
    pool.release(pages)
    return cache.match_prefix(tokens)


def test_match_is_page_aligned_and_ignores_partial_tails():
    pool, cache, _ = make()
    assert cache.match_prefix(A + B) == []
    pages = pool.alloc(3)
    assert cache.insert(A + B + C, pages) == 3
    assert [pool.refcount[p] for p in pages] == [2, 2, 2]
    assert cache.match_prefix(A + B + C) == pages
    assert cache.match_prefix(A + B + C + [9, 9]) == pages  # a partial page after the prefix
    assert cache.match_prefix(A + B[:-1]) == pages[:1]  # the second page is incomplete
    assert cache.match_prefix(A + [2, 2, 2, 7]) == pages[:1]  # diverges inside the second page
    assert cache.match_prefix(A[:-1]) == []
    assert cache.match_prefix(B + A) == []
    assert cache.num_pages == 3


def test_insert_rejects_misaligned_input():
    _, cache, _ = make()
    with pytest.raises(ValueError):
        cache.insert(A + [1], [1])


def test_split_keeps_old_pages_and_adopts_only_the_new_branch():
    pool, cache, events = make()
    abc = pool.alloc(3)
    cache.insert(A + B + C, abc)
    abd = pool.alloc(3)  # a request that computed A B D itself
    assert cache.insert(A + B + D, abd) == 1
    assert cache.match_prefix(A + B + D) == abc[:2] + abd[2:]
    assert cache.match_prefix(A + B + C) == abc
    pool.release(abc + abd)  # both requests finish: their duplicate A, B pages are freed
    assert [pool.refcount[p] for p in abd] == [0, 0, 1]
    assert cache.num_pages == 4 and pool.num_free == pool.capacity - 4
    assert events == [("insert", A + B + C), ("insert", A + B + D)]


def test_insert_of_a_cached_prefix_adopts_nothing():
    pool, cache, events = make()
    ab = pool.alloc(2)
    cache.insert(A + B, ab)
    dup = pool.alloc(2)
    assert cache.insert(A + B, dup) == 0
    assert cache.insert(A, dup[:1]) == 0  # a shorter prefix splits the node, still adopts nothing
    assert cache.match_prefix(A + B) == ab
    assert pool.release(dup) == 2
    assert cache.num_pages == 2 and events == [("insert", A + B)]


def test_lru_eviction_order():
    pool, cache, events = make()
    for seq in (A, B, C):
        compute(pool, cache, seq)
    cache.match_prefix(A)  # A becomes the most recently used
    order = []
    for _ in range(3):
        assert cache.evict(1) == 1
        order.append(events[-1])
    assert order == [("evict", B), ("evict", C), ("evict", A)]
    assert cache.evict(1) == 0 and pool.num_free == pool.capacity


def test_eviction_never_frees_a_referenced_page():
    pool, cache, _ = make()
    pages = compute(pool, cache, A + B)
    pool.ref(pages)  # a running request reuses the prefix
    assert cache.evictable_pages() == 0
    assert cache.evict(10) == 0
    assert cache.match_prefix(A + B) == pages
    pool.release(pages)
    assert cache.evictable_pages() == 2
    assert cache.evict(10) == 2 and pool.num_free == pool.capacity


def test_parents_become_evictable_after_their_children():
    pool, cache, events = make()
    compute(pool, cache, A + B)
    compute(pool, cache, A + C)
    events.clear()
    assert cache.evict(1) == 1  # one leaf, not the shared parent
    assert len(events) == 1 and events[0][1] in (A + B, A + C)
    assert cache.evict(2) == 2
    other = A + C if events[0][1] == A + B else A + B
    assert events[1:] == [("evict", other), ("evict", A)]
    assert cache.num_pages == 0 and pool.num_free == pool.capacity


def test_evict_frees_the_unreferenced_tail_of_a_partly_referenced_leaf():
    """A request that reuses only the head of a cached leaf must not pin the leaf's tail: otherwise the
    oldest request can be starved of pages that nothing uses (see test_scheduler)."""
    pool, cache, events = make(num_pages=5)
    pages = compute(pool, cache, A + B + C)
    head = cache.match_prefix(A + D)
    pool.ref(head)
    assert head == pages[:1]
    assert cache.evictable_pages() == 2
    assert cache.evict(2) == 2
    assert events[-1] == ("evict", A + B + C)
    assert cache.match_prefix(A + B + C) == pages[:1]
    assert pool.refcount[pages[0]] == 2 and pool.num_free == 3
    pool.release(head)
    assert cache.evict(1) == 1 and events[-1] == ("evict", A)
    assert pool.num_free == pool.capacity


def test_reset_drops_the_tree_but_not_request_references():
    pool, cache, events = make()
    held = compute(pool, cache, A + B)
    compute(pool, cache, A + C)
    pool.ref(held)
    events.clear()
    cache.reset()
    assert cache.num_pages == 0 and cache.match_prefix(A + B) == [] and cache.evictable_pages() == 0
    assert [pool.refcount[p] for p in held] == [1, 1]
    assert pool.num_free == pool.capacity - 2
    assert sorted(events) == [("evict", A), ("evict", A + B), ("evict", A + C)]
    pool.release(held)
    assert pool.num_free == pool.capacity
    assert compute(pool, cache, A + B) != []  # still usable


# ---------------------------------------------------------------------------------------- property
class Model:
    """The naive reference: every cached page-aligned prefix (as a tuple) -> the page of its last page."""

    def __init__(self) -> None:
        self.cached: dict[tuple[int, ...], int] = {}

    def match(self, tokens: list[int]) -> list[int]:
        pages = []
        for k in range(1, len(tokens) // PS + 1):
            page = self.cached.get(tuple(tokens[: k * PS]))
            if page is None:
                break
            pages.append(page)
        return pages

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        adopted = 0
        for k in range(1, len(pages) + 1):
            key = tuple(tokens[: k * PS])
            if key not in self.cached:
                self.cached[key] = pages[k - 1]
                adopted += 1
        return adopted


def random_tokens(rng: random.Random) -> list[int]:
    # a tiny alphabet makes shared prefixes (and splits) common
    n = rng.randrange(0, 15)
    return [rng.choice((0, 1)) if rng.random() < 0.8 else rng.randrange(4) for _ in range(n)]


def evict(cache: RadixCache, model: Model, held: list[list[int]], n: int) -> None:
    """Evict through the cache, then drop from the model what is gone; only unreferenced pages may go."""
    before, cached_before = cache.evictable_pages(), dict(model.cached)
    freed = cache.evict(n)
    assert min(n, before) <= freed <= before
    still = {k for k in cached_before if len(cache.match_prefix(list(k))) == len(k) // PS}
    model.cached = {k: p for k, p in cached_before.items() if k in still}
    gone = set(cached_before.values()) - set(model.cached.values())
    assert len(gone) == freed and not gone & {p for pages in held for p in pages}
    assert all(cache.pool.refcount[p] == 0 for p in gone)


def check_invariants(pool: PagePool, cache: RadixCache, model: Model, held: list[list[int]]) -> None:
    tree_pages = set(model.cached.values())
    assert len(tree_pages) == len(model.cached) == cache.num_pages
    for key, page in model.cached.items():
        assert cache.match_prefix(list(key))[-1] == page
    for page in range(pool.num_pages):
        want = (page in tree_pages) + sum(pages.count(page) for pages in held)
        assert pool.refcount[page] == want, page
    used = {p for p in range(pool.num_pages) if pool.refcount[p] > 0}
    assert 0 not in used and pool.num_free + len(used) == pool.capacity
    request_pages = {p for pages in held for p in pages}
    assert cache.evictable_pages() == len(tree_pages - request_pages)


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_match_the_naive_model(seed):
    rng = random.Random(seed)
    pool, cache, _ = make(num_pages=25)
    model, held = Model(), []  # held: the page references of "running requests"
    for _ in range(400):
        op, tokens = rng.random(), random_tokens(rng)
        if op < 0.25:  # match
            assert cache.match_prefix(tokens) == model.match(tokens)
        elif op < 0.45:  # a request reuses a prefix and keeps running
            pages = cache.match_prefix(tokens)
            pool.ref(pages)
            held.append(pages)
        elif op < 0.6 and held:  # a running request ends
            pool.release(held.pop(rng.randrange(len(held))))
        elif op < 0.85:  # a request computes, inserts and finishes
            full = len(tokens) // PS
            pages = cache.match_prefix(tokens)
            pool.ref(pages)  # before evicting, so that eviction cannot take them
            need = full - len(pages)
            if pool.num_free < need:
                evict(cache, model, held + [pages], need - pool.num_free)
            new = pool.alloc(need)
            if new is None:
                pool.release(pages)
                continue
            pages += new
            assert cache.insert(tokens[: full * PS], pages) == model.insert(tokens, pages)
            pool.release(pages)
        else:
            evict(cache, model, held, rng.randint(1, 6))
        check_invariants(pool, cache, model, held)
    for pages in held:
        pool.release(pages)
    total = cache.num_pages
    assert cache.evict(pool.capacity) == total
    assert cache.num_pages == 0 and pool.num_free == pool.capacity
