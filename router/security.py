"""API keys and rate limits of /v1/*, as pure ASGI middleware (streams pass untouched).

With keys set, a request needs `Authorization: Bearer <key>` (compared in constant time against every
key) or gets 401. With a rate, each API key (or client address, without keys) has a token bucket of
`burst` requests refilled at `rate` per second; an empty bucket answers 429 with Retry-After.
/health, /metrics and /workers stay open: they are for the operator's probes, not for clients.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import Sequence
from typing import Any

from router.errors import error_body

PROTECTED_PREFIX = "/v1/"
MAX_BUCKETS = 10_000


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def take(self, now: float) -> float:
        """0 if a request may pass now (and take its token), else the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    def __init__(self, rate: float, burst: int = 0) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self.buckets: dict[str, TokenBucket] = {}

    def wait(self, client: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(client)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self.buckets[client] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing."""
        refill = self.burst / self.rate
        self.buckets = {k: b for k, b in self.buckets.items() if now - b.stamp < refill}


def key_matches(presented: str, keys: Sequence[str]) -> bool:
    ok = False
    for key in keys:  # every key is compared, so timing tells nothing about which one came close
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class SecurityGate:
    def __init__(self, app: Any, keys: Sequence[str], limiter: RateLimiter | None) -> None:
        self.app = app
        self.keys = list(keys)
        self.limiter = limiter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        token = bearer(scope.get("headers", []))
        if self.keys and (token is None or not key_matches(token, self.keys)):
            message = "Incorrect API key provided." if token else "Missing API key (Authorization: Bearer)."
            return await _reply(send, 401, message, "invalid_api_key", {"www-authenticate": "Bearer"})
        if self.limiter is not None:
            client = f"key:{token}" if self.keys else f"addr:{(scope.get('client') or ('-', 0))[0]}"
            wait = self.limiter.wait(client)
            if wait > 0:
                return await _reply(send, 429, f"rate limit of {self.limiter.rate:g} requests per second "
                                    "exceeded; retry later", "rate_limit_exceeded",
                                    {"retry-after": str(max(1, math.ceil(wait)))})
        await self.app(scope, receive, send)


async def _reply(send: Any, status: int, message: str, code: str, headers: dict[str, str]) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
