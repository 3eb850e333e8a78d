"""PagePool: reference counting, the reserved page 0, all-or-nothing allocation and misuse errors."""

from __future__ import annotations

import random

import pytest

from mixquant_serve.kvcache.page_pool import PagePool


def test_alloc_hands_out_distinct_pages_and_never_page_zero():
    pool = PagePool(num_pages=9, page_size=4)
    assert pool.capacity == 8 and pool.num_free == 8 and pool.num_used() == 0
    pages = pool.alloc(8)
    assert sorted(pages) == list(range(1, 9))
    assert all(pool.refcount[p] == 1 for p in pages)
    assert pool.refcount[0] == 0
    assert pool.num_free == 0 and pool.num_used() == 8


def test_alloc_is_all_or_nothing():
    pool = PagePool(num_pages=5, page_size=4)
    first = pool.alloc(3)
    assert pool.alloc(2) is None
    assert pool.num_free == 1 and all(pool.refcount[p] == 0 for p in range(5) if p not in first)
    assert pool.alloc(1) is not None
    assert pool.alloc(0) == []


def test_shared_page_frees_on_last_release():
    pool = PagePool(num_pages=4, page_size=2)
    a, b = pool.alloc(2)
    pool.ref([a, a])
    assert pool.refcount[a] == 3
    assert pool.release([a, b]) == 1  # b was only referenced once
    assert pool.num_free == 2
    assert pool.release([a]) == 0 and pool.release([a]) == 1
    assert pool.num_free == 3 and pool.refcount[a] == 0
    assert pool.alloc(3) is not None  # a came back


def test_misuse_raises():
    pool = PagePool(num_pages=4, page_size=2)
    (p,) = pool.alloc(1)
    pool.release([p])
    with pytest.raises(RuntimeError):
        pool.release([p])  # double release
    with pytest.raises(RuntimeError):
        pool.ref([p])  # ref of a free page
    with pytest.raises(RuntimeError):
        pool.ref([0])  # the reserved page is never allocated
    with pytest.raises(RuntimeError):
        pool.release([0])
    assert pool.num_free == 3
    with pytest.raises(ValueError):
        PagePool(num_pages=1, page_size=2)


def test_pages_for_rounds_up():
    pool = PagePool(num_pages=3, page_size=16)
    assert [pool.pages_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_random_bookkeeping_matches_a_model():
    rng = random.Random(0)
    pool = PagePool(num_pages=17, page_size=4)
    held: list[int] = []  # one entry per reference we hold
    for _ in range(2000):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(0, 5)
            got = pool.alloc(n)
            free_before = pool.capacity - len(set(held))
            assert (got is None) == (n > free_before)
            if got:
                assert not set(got) & set(held) and 0 not in got
                held += got
        elif op < 0.6 and held:
            p = rng.choice(held)
            pool.ref([p])
            held.append(p)
        elif held:
            p = held.pop(rng.randrange(len(held)))
            pool.release([p])
        for page in range(1, pool.num_pages):
            assert pool.refcount[page] == held.count(page)
        assert pool.num_free == pool.capacity - len(set(held))
        assert pool.num_free + pool.num_used() == pool.capacity
