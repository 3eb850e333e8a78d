"""Container health check: exits 0 when the target answers, 1 (with the reason on stderr) when not.

    python /opt/mixquant/healthcheck.py [TARGET]

TARGET (default: $MIXQUANT_HEALTH_URL, else http://127.0.0.1:8000/health):
  http://host:port/path   must answer 200: the router's /health is its readiness (the configured topology
                          is up), /health/live its liveness;
  tcp://host:port         must accept a connection: a worker's control port, which it binds once its model is
                          loaded (a worker that stops answering is taken out of rotation by the router's
                          heartbeat timeout, --worker-timeout).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from urllib.parse import urlsplit

DEFAULT_TARGET = "http://127.0.0.1:8000/health"


def check(target: str, timeout: float = 4.0) -> None:
    """Raises OSError (urllib's HTTPError for a non-200 answer) when the target is not healthy."""
    parts = urlsplit(target)
    if parts.scheme == "tcp":
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=timeout):
            return
    if parts.scheme not in ("http", "https"):
        raise OSError(f"unsupported health target {target!r} (http://, https:// or tcp://)")
    with urllib.request.urlopen(target, timeout=timeout) as answer:  # noqa: S310 (the scheme is checked above)
        if answer.status != 200:
            raise OSError(f"{target} answered {answer.status}")


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else os.environ.get("MIXQUANT_HEALTH_URL", DEFAULT_TARGET)
    try:
        check(target)
    except OSError as e:
        print(f"unhealthy: {target}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
