"""Page ids of the paged KV cache: a free list and reference counts.

A page holds `page_size` consecutive token positions of one sequence, in every layer. A page is owned
through references: each running request holds one on each page of its page table, and the radix cache
holds one on each page it stores. A page returns to the free list when its last reference goes.
Page 0 is never handed out: batched kernels use it as a padding target.
"""

from __future__ import annotations

from collections.abc import Iterable


class PagePool:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def capacity(self) -> int:
        """Pages that can ever be allocated (all but the reserved one)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def alloc(self, n: int) -> list[int] | None:
        """n fresh pages with one reference each, or None (and nothing taken) if fewer are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def ref(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self.refcount[p] <= 0:
                raise RuntimeError(f"page {p} is not allocated")
            self.refcount[p] += 1

    def release(self, pages: Iterable[int]) -> int:
        """Drop one reference from each page; returns how many pages became free."""
        freed = 0
        for p in pages:
            rc = self.refcount[p] - 1
            if rc < 0:
                raise RuntimeError(f"page {p} released more often than referenced")
            self.refcount[p] = rc
            if rc == 0:
                self._free.append(p)
                freed += 1
        return freed

    def num_used(self) -> int:
        return self.capacity - len(self._free)
