"""The router's OpenAPI document (GET /openapi.json) with what FastAPI cannot see on its own.

The generation endpoints read their bodies themselves (size limit first, then the pydantic schema; see
http_io.read_request), so FastAPI knows neither the request bodies nor the errors. `install` adds both:
each body as its pydantic schema, and every error status the endpoint can answer with OpenAI's error
object. Tools that read the document (client generators, schemathesis) then see the API clients get.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from router.openai_api import ChatCompletionRequest, CompletionRequest

BODIES: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionRequest,
                                      "/v1/completions": CompletionRequest}
ERRORS = {"400": "invalid request", "401": "missing or wrong API key", "404": "unknown model",
          "413": "body too large", "422": "a field has the wrong type",
          "429": "too many requests in flight, or a worker's queue is full (see Retry-After)",
          "503": "no worker can answer now"}
_REF = "#/components/schemas/{model}"
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ERROR_SCHEMA
    error = {"$ref": _REF.format(model="ErrorResponse")}
    for path, model in BODIES.items():
        body = model.model_json_schema(ref_template=_REF)
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": _json({"$ref": _REF.format(model=model.__name__)})}
        op["responses"]["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        op["responses"].update({status: {"description": why, "content": _json(error)}
                                for status, why in ERRORS.items()})
    return doc


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi
