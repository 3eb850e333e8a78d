"""Chained hashes of full KV pages, shared by workers (who report what they cache) and the router (who
matches a prompt against those reports). Hash i covers tokens [0, (i+1)*page_size), so a set of hashes
per worker is enough to find the longest cached prefix.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def chain_hashes(tokens: Sequence[int], page_size: int, limit: int | None = None) -> list[int]:
    """One 63-bit hash per full page of `tokens` (at most `limit`), each folding in all before it."""
    n = len(tokens) // page_size if limit is None else min(limit, len(tokens) // page_size)
    out, prev = [], b""
    for i in range(n):
        page = struct.pack(f"<{page_size}i", *tokens[i * page_size : (i + 1) * page_size])
        prev = hashlib.blake2b(prev + page, digest_size=8).digest()
        out.append(int.from_bytes(prev, "little") >> 1)
    return out


def cached_prefix_pages(tokens: Sequence[int], page_size: int, known: set[int] | frozenset[int]) -> int:
    """How many leading full pages of `tokens` a worker holding the hashes `known` has cached."""
    n = 0
    for h in chain_hashes(tokens, page_size):
        if h not in known:
            break
        n += 1
    return n
