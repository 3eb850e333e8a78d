"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with a fitting HTTP status."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}

# error_code of a failed ReqOutput -> HTTP status
_WORKER_CODES = {
    "context_length_exceeded": 400,
    "invalid_request": 400,
    "bad_request": 400,
    "overloaded": 429,  # the worker's queue for KV cache space is full
    "worker_unavailable": 503,
    "aborted": 503,
    "kv_transfer_failed": 503,
}


RETRY_AFTER_S = 1  # what a 429 asks a client to wait (the Retry-After header)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None
               ) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def worker_error(message: str | None, code: str | None, param: str | None = None) -> APIError:
    """The APIError for a request that a worker failed (or that failed with its worker)."""
    status = _WORKER_CODES.get(code or "", 500)
    return APIError(status, message or "the worker failed the request", param=param, code=code or "internal_error")


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic errors into one message naming each field, and the first field as `param`."""
    parts, first = [], None
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        first = first or loc or None
        parts.append(f"{loc}: {err.get('msg', 'invalid value')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", first
