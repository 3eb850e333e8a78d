"""The router's FastAPI app: OpenAI endpoints, health, workers, metrics; run by uvicorn on uvloop."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixquant_serve.tokenizer import Tokenizer
from router import openapi_doc, serving
from router.args import RouterConfig, parse_args
from router.errors import APIError, error_body, validation_message
from router.metrics import RouterMetrics
from router.params import SamplingDefaults
from router.placement import PolicySettings, create_policy
from router.reasoning import template_thinks
from router.registry import Registry
from router.security import RateLimiter, SecurityGate
from router.serving import RouterState
from router.workers import WorkerPool

log = logging.getLogger("router")
access_log = logging.getLogger("router.access")


def create_app(cfg: RouterConfig) -> FastAPI:
    template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
    tokenizer = Tokenizer.from_path(cfg.model_path, chat_template=template)
    pool = WorkerPool(cfg.static_workers, cfg.worker_timeout)
    settings = PolicySettings(cfg.session_ttl, cfg.overload_threshold, cfg.balance_margin)
    policy = create_policy(cfg.policy, settings)
    reasoning = cfg.reasoning_parser == "qwen3" or (cfg.reasoning_parser == "auto"
                                                    and template_thinks(tokenizer.chat_template))
    defaults = SamplingDefaults.load(cfg.model_path, cfg.sampling_defaults)
    if defaults != SamplingDefaults():
        log.info("sampling defaults from the model's generation_config.json (a request's own values win): %s",
                 ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(defaults).items()))
    state = RouterState(cfg, tokenizer, pool, policy, RouterMetrics(pool, policy), reasoning, defaults)
    registry = Registry(pool, cfg.host, cfg.registry_port) if cfg.registry_port else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        if registry is not None:
            await registry.start()
        log.info("router %s serves %r through %d static workers, policy %s%s", pool.router_id,
                 cfg.model_name, len(pool.links), cfg.policy, ", reasoning parser qwen3" if reasoning else "")
        yield
        if registry is not None:
            await registry.stop()
        await pool.stop()

    app = FastAPI(title="mixquant-serve router", lifespan=lifespan)
    app.state.router = state
    app.state.registry = registry
    _add_routes(app, state)
    _add_error_handlers(app)
    openapi_doc.install(app)
    limiter = RateLimiter(cfg.rate_limit, cfg.rate_limit_burst) if cfg.rate_limit > 0 else None
    if cfg.api_key or limiter is not None:
        app.add_middleware(SecurityGate, keys=cfg.api_key, limiter=limiter)
    app.add_middleware(AccessLog, metrics=state.metrics)
    return app


def _add_routes(app: FastAPI, state: RouterState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serving.chat_completions(state, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serving.completions(state, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        state.check_model(model)
        return _model_card(state)

    @app.get("/health")
    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        """Readiness: the healthy workers form the configured topology (--min-prefill/decode-workers)."""
        cfg, pool = state.cfg, state.pool
        r = pool.readiness(cfg.min_prefill_workers, cfg.min_decode_workers)
        body: dict[str, Any] = {"status": "ok" if r.ready else "unavailable", "ready": r.ready,
                                "reason": r.reason(), "healthy_workers": len(pool.healthy()),
                                "workers": len(pool.links), "serving_workers": r.decode, "prefill_workers": r.prefill,
                                "min_prefill_workers": r.need_prefill, "min_decode_workers": r.need_decode}
        if not r.ready:
            code = "no_healthy_worker" if not r.decode else "not_ready"
            body |= error_body(503, r.reason(), code=code)
        return JSONResponse(body, status_code=200 if r.ready else 503)

    @app.get("/health/live")
    async def live() -> JSONResponse:
        """Liveness: the event loop answers and the worker health watch (and registration socket) still run."""
        registry = app.state.registry
        alive = state.pool.alive and (registry is None or (registry.task is not None and not registry.task.done()))
        if alive:
            return JSONResponse({"status": "alive"})
        return JSONResponse({"status": "dead"} | error_body(500, "a router task stopped", code="router_dead"),
                            status_code=500)

    @app.get("/workers")
    async def workers() -> list[dict[str, Any]]:
        table = state.policy.sessions
        bound = table.per_worker() if table is not None else {}
        return [link.snapshot(bound.get(link.url, 0)) for link in state.pool.links]

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(state: RouterState) -> dict[str, Any]:
    return {"id": state.cfg.model_name, "object": "model", "created": 0, "owned_by": "mixquant-serve",
            "root": state.cfg.model_path, "max_model_len": state.pool.context_length}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return APIError(400, "the body is not valid JSON", code="invalid_json").response()
        message, param = validation_message(errors)
        return APIError(422, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()


class AccessLog:
    """Pure ASGI middleware: one log line and one request metric per HTTP request, streams included."""

    def __init__(self, app: Any, metrics: RouterMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - start
            client = scope.get("client") or ("-", 0)
            access_log.info('%s:%s "%s %s" %d %.1f ms', client[0], client[1], scope["method"], scope["path"],
                            status, seconds * 1000)
            self.metrics.observe_request(scope["path"], status, seconds)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, loop="uvloop", log_level=cfg.log_level, access_log=False,
                log_config=None, timeout_graceful_shutdown=10)
