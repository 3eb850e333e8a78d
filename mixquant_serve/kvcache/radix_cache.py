"""Radix prefix cache over token ids at page granularity, with LRU eviction of unreferenced pages.

Every edge key is a whole number of pages of tokens, so a match is always page-aligned and a request
never writes into a page it shares. The tree holds one pool reference on each page it stores; a
request that reuses a prefix takes its own references. A leaf is evictable when the tree's reference
is the only one left on all its pages.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence

from mixquant_serve.kvcache.page_pool import PagePool

_tick = itertools.count()


class _Node:
    __slots__ = ("key", "pages", "children", "parent", "last_access")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: _Node | None) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], _Node] = {}
        self.parent = parent
        self.last_access = next(_tick)


CacheListener = Callable[[str, Sequence[int], int], None]
"""Called with ("insert" | "evict", the token prefix ending at the node, the node's page count) when
the tree gains or loses a node's pages."""


class RadixCache:
    def __init__(self, pool: PagePool, listener: CacheListener | None = None) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = _Node((), [], None)
        self.num_pages = 0
        self.listener = listener
        self.created = time.monotonic()

    def _first_page(self, tokens: Sequence[int], pos: int) -> tuple[int, ...]:
        return tuple(tokens[pos : pos + self.page_size])

    def _common_pages(self, key: tuple[int, ...], tokens: Sequence[int], pos: int) -> int:
        """How many whole pages of `key` equal tokens[pos:]."""
        ps, n = self.page_size, 0
        limit = min(len(key), len(tokens) - pos) // ps
        while n < limit and key[n * ps : (n + 1) * ps] == tuple(tokens[pos + n * ps : pos + (n + 1) * ps]):
            n += 1
        return n

    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Pages holding the longest cached page-aligned prefix of `tokens` (no references taken)."""
        node, pos, pages = self.root, 0, []
        while len(tokens) - pos >= self.page_size:
            child = node.children.get(self._first_page(tokens, pos))
            if child is None:
                break
            n = self._common_pages(child.key, tokens, pos)
            pages.extend(child.pages[:n])
            child.last_access = next(_tick)
            pos += n * self.page_size
            if n * self.page_size < len(child.key):
                break
            node = child
        return pages

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Store pages[i] as the KV of tokens[i*ps:(i+1)*ps]; returns how many pages the tree adopted.

        The tree takes a reference on the pages it adopts; where it already holds the same prefix it
        keeps its own pages. The caller keeps (and later releases) its references either way.
        """
        ps = self.page_size
        if len(tokens) != len(pages) * ps:
            raise ValueError(f"insert needs {len(pages) * ps} tokens for {len(pages)} pages, "
                             f"got {len(tokens)}")
        node, pos = self.root, 0
        while pos < len(tokens):
            first = self._first_page(tokens, pos)
            child = node.children.get(first)
            if child is None:
                return self._add_leaf(node, tokens, pages, pos)
            n = self._common_pages(child.key, tokens, pos)
            if n * ps < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_tick)
            node, pos = child, pos + n * ps
        return 0

    def _add_leaf(self, parent: _Node, tokens: Sequence[int], pages: Sequence[int], pos: int) -> int:
        new_pages = list(pages[pos // self.page_size :])
        leaf = _Node(tuple(tokens[pos:]), new_pages, parent)
        parent.children[leaf.key[: self.page_size]] = leaf
        self.pool.ref(new_pages)
        self.num_pages += len(new_pages)
        if self.listener:
            self.listener("insert", tokens, len(new_pages))
        return len(new_pages)

    def _split(self, child: _Node, n_pages: int) -> _Node:
        """Cut child's edge after n_pages pages; returns the new upper node."""
        cut = n_pages * self.page_size
        upper = _Node(child.key[:cut], child.pages[:n_pages], child.parent)
        upper.last_access = child.last_access
        child.parent.children[upper.key[: self.page_size]] = upper
        child.key, child.pages, child.parent = child.key[cut:], child.pages[n_pages:], upper
        upper.children[child.key[: self.page_size]] = child
        return upper

    def _evictable(self, node: _Node) -> bool:
        """A leaf whose last page only the tree references: at least its unreferenced tail can go."""
        return node is not self.root and not node.children and self.pool.refcount[node.pages[-1]] == 1

    def _referenced_head(self, node: _Node) -> int:
        """How many leading pages of node a request still references (requests hold page-aligned prefixes)."""
        rc, keep = self.pool.refcount, len(node.pages)
        while keep and rc[node.pages[keep - 1]] == 1:
            keep -= 1
        return keep

    def evict(self, num_pages: int) -> int:
        """Free at least num_pages pages if possible, least recently used leaves first; returns pages freed.

        A leaf whose head pages a request reuses gives up only its tail (the node is split there), so a
        request never pins cached pages that lie beyond its own prefix.
        """
        heap = [(n.last_access, id(n), n) for n in self._nodes() if self._evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            if keep := self._referenced_head(node):
                self._split(node, keep)  # node becomes the unreferenced tail
            freed += self._remove_leaf(node)
            parent = node.parent
            if self._evictable(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _remove_leaf(self, node: _Node) -> int:
        if self.listener:
            self.listener("evict", self._prefix_of(node), len(node.pages))
        del node.parent.children[node.key[: self.page_size]]
        self.num_pages -= len(node.pages)
        return self.pool.release(node.pages)

    def _prefix_of(self, node: _Node) -> list[int]:
        parts = []
        while node is not self.root:
            parts.append(node.key)
            node = node.parent
        return [t for key in reversed(parts) for t in key]

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def evictable_pages(self) -> int:
        rc = self.pool.refcount
        return sum(1 for n in self._nodes() for p in n.pages if rc[p] == 1)

    def reset(self) -> None:
        """Drop every cached page (pages still referenced by requests stay allocated)."""
        for node in reversed(list(self._nodes())):  # children before their parents, as evict reports them
            if node is not self.root:
                if self.listener:
                    self.listener("evict", self._prefix_of(node), len(node.pages))
                self.pool.release(node.pages)
        self.root = _Node((), [], None)
        self.num_pages = 0
