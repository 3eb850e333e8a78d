"""HTTP plumbing of the generation endpoints: bounded body reading and a server-sent-events response."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from router.errors import APIError, validation_message
from router.generation import ClientDisconnected

M = TypeVar("M", bound=BaseModel)


async def read_request(request: Request, schema: type[M], max_bytes: int) -> M:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            message = f"the body is not valid JSON: {errors[0]['msg']}"
            raise APIError(400, message, code="invalid_json") from None
        message, param = validation_message(errors)
        raise APIError(422, message, param=param, code="invalid_value") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")


class SSEResponse(Response):
    """Server-sent events from an async iterator; `on_close` runs however the stream ends.

    Disconnects are noticed by Generation.watch, which ends the iterator; sending to a closed connection
    is harmless (the server drops it).
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: list[Callable[[], None]]) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})  # no content-length
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            try:
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except ClientDisconnected:
                pass
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass
        finally:
            for fn in self.on_close:
                fn()
