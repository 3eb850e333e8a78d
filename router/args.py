"""Router configuration: a frozen dataclass whose fields give argparse its defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields, replace

from router.placement import POLICIES

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
REASONING_PARSERS = ("auto", "qwen3", "none")
SAMPLING_DEFAULT_SOURCES = ("model", "openai")
TOOL_CALL_CONSTRAINTS = ("all", "strict")

# Tokens a turn may add beyond what its decode worker holds and still be prefilled there (BF16) instead of
# on a prefill worker. benchmarks/agent_sessions.py sweeps this value (RESULTS.md, "Agent sessions"): on CPU
# a local prefill beat the round trip at every delta measured up to ~500 tokens, and N=1024 gave the lowest
# turn-2+ TTFT with both NVFP4 and BF16 prefill workers. Longer deltas (big tool outputs, retrieved
# documents) still go to the prefill workers. A GPU run of the sweep may move it.
DEFAULT_LOCAL_PREFILL_MAX_TOKENS = 1024


@dataclass(frozen=True)
class RouterConfig:
    model_path: str = ""
    worker_urls: tuple[str, ...] = ()
    prefill_urls: tuple[str, ...] = ()
    decode_urls: tuple[str, ...] = ()
    registry_port: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    chat_template: str | None = None
    reasoning_parser: str = "auto"
    tool_call_constraint: str = "all"
    sampling_defaults: str = "model"
    policy: str = "affinity"
    session_ttl: float = 600.0
    overload_threshold: int = 4
    balance_margin: int = 2
    local_prefill_max_tokens: int = DEFAULT_LOCAL_PREFILL_MAX_TOKENS
    max_request_bytes: int = 32 * 1024 * 1024
    max_pending_requests: int = 1024
    worker_timeout: float = 15.0
    min_prefill_workers: int = -1
    min_decode_workers: int = 1
    api_key: tuple[str, ...] = ()
    rate_limit: float = 0.0
    rate_limit_burst: int = 0
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model_path))

    @property
    def static_workers(self) -> list[tuple[str, str]]:
        """(url, role) of every worker named on the command line."""
        return ([(u, "colocated") for u in self.worker_urls] + [(u, "prefill") for u in self.prefill_urls]
                + [(u, "decode") for u in self.decode_urls])


_HELP = {
    "model_path": "folder with the tokenizer (and chat template) of the served model",
    "worker_urls": "comma-separated ZMQ addresses of colocated workers, e.g. tcp://127.0.0.1:5555",
    "prefill_urls": "comma-separated ZMQ addresses of prefill workers (disaggregated serving)",
    "decode_urls": "comma-separated ZMQ addresses of decode workers (disaggregated serving)",
    "registry_port": "port of the registration socket that workers started with --router-url announce "
                     "themselves to (0: off)",
    "host": "address the HTTP server and the registration socket bind to",
    "port": "HTTP port",
    "served_model_name": "model name clients send (default: the model folder's name)",
    "chat_template": "a Jinja chat template file that replaces the tokenizer's (tools included)",
    "sampling_defaults": "defaults of the sampling fields a request leaves out: model (the model folder's "
                         "generation_config.json, e.g. Qwen3's temperature 0.6, top_p 0.95, top_k 20) or openai "
                         "(temperature 1, top_p 1, no top_k)",
    "reasoning_parser": "split <think>...</think> into reasoning_content: qwen3, none, or auto (qwen3 when "
                        "the chat template mentions <think>)",
    "tool_call_constraint": "tool_choice auto: all (every call the model opens is held to an offered function "
                            "and its parameters schema) or strict (only functions marked strict: true are held "
                            "to their schema; named and required tool_choice are always constrained)",
    "policy": "placement: affinity (sessions stay on one prefill/decode pair, new ones go where their "
              "prefix is cached), round_robin (prefill and decode chosen independently per request, no "
              "affinity), least_loaded (per request, no affinity)",
    "session_ttl": "seconds a session binding survives without a request",
    "overload_threshold": "a worker is overloaded when more than this many requests wait on it (queued for "
                          "lack of running slots or KV pages, as its heartbeat reports) and another worker "
                          "of its role waits less; only then (or when it fails or drains) do sessions move",
    "balance_margin": "a new session goes to the worker that caches most of its prompt only while that "
                      "worker has at most this many more requests in flight than the least loaded one",
    "local_prefill_max_tokens": "decode workers prefill a turn themselves when it adds fewer tokens than "
                                "this beyond their cache (0: always on a prefill worker)",
    "max_request_bytes": "largest request body accepted (413 above)",
    "max_pending_requests": "most generation requests in flight at once (429 above)",
    "worker_timeout": "seconds without a heartbeat after which a worker counts as unhealthy (a worker process "
                      "that exits is noticed at once, by its closed connection; this catches hung ones)",
    "min_prefill_workers": "healthy prefill workers /health needs before it answers ready (-1: auto, 1 once a "
                           "prefill worker is known, named by --prefill-urls or registered, else 0); set it where "
                           "workers register, so that a decode worker alone does not count as ready",
    "min_decode_workers": "healthy workers that decode (decode or colocated) /health needs before it answers ready",
    "api_key": "comma-separated API keys; when set, /v1/* needs 'Authorization: Bearer KEY' (default: the "
               "MIXQUANT_API_KEY environment variable)",
    "rate_limit": "requests per second allowed per API key (or client address without keys); 0: no limit",
    "rate_limit_burst": "requests a client may send at once before the rate applies (0: the rate, >= 1)",
    "log_level": "log level of the router and uvicorn",
}

_LISTS = ("worker_urls", "prefill_urls", "decode_urls", "api_key")
_CHOICES = {"policy": tuple(sorted(POLICIES)), "reasoning_parser": REASONING_PARSERS, "log_level": LOG_LEVELS,
            "sampling_defaults": SAMPLING_DEFAULT_SOURCES, "tool_call_constraint": TOOL_CALL_CONSTRAINTS}


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in text.split(",") if u.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m router", description="OpenAI-compatible HTTP router",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = RouterConfig()
    for f in fields(RouterConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name in _LISTS:
            parser.add_argument(flag, type=_comma_list, default=default, help=_HELP[f.name])
        elif f.name == "model_path":
            parser.add_argument(flag, required=True, help=_HELP[f.name])
        elif f.name in _CHOICES:
            parser.add_argument(flag, type=str.lower, choices=_CHOICES[f.name], default=default,
                                help=_HELP[f.name])
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default, help=_HELP[f.name])
    return parser


def parse_args(argv: list[str] | None = None) -> RouterConfig:
    parser = build_parser()
    cfg = RouterConfig(**vars(parser.parse_args(argv)))
    if not cfg.api_key and os.environ.get("MIXQUANT_API_KEY"):
        cfg = replace(cfg, api_key=_comma_list(os.environ["MIXQUANT_API_KEY"]))
    if not cfg.static_workers and not cfg.registry_port:
        parser.error("name workers (--worker-urls, --prefill-urls, --decode-urls) or open --registry-port")
    if cfg.prefill_urls and not cfg.decode_urls and not cfg.registry_port:
        parser.error("--prefill-urls needs --decode-urls: prefill workers never answer requests themselves")
    if not os.path.isdir(cfg.model_path):
        parser.error(f"--model-path {cfg.model_path!r} is not a folder")
    for name in ("session_ttl", "rate_limit", "overload_threshold", "balance_margin",
                 "local_prefill_max_tokens", "rate_limit_burst", "registry_port"):
        if getattr(cfg, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if cfg.min_prefill_workers < -1:
        parser.error("--min-prefill-workers must be -1 (auto) or more")
    if cfg.min_decode_workers < 1:
        parser.error("--min-decode-workers must be at least 1")
    return cfg
