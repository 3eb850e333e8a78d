"""Command line shared by the worker processes: engine flags plus where to listen and whom to tell."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Callable

import torch

from mixquant_serve.cli_args import add_engine_args, dataclass_from_args
from mixquant_serve.config import ConfigError, EngineConfig


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address the control port binds to (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="control port (0: any free port, printed at start)")
    p.add_argument("--advertise-host", default=None,
                   help="host name others use to reach this worker (default: --host)")
    p.add_argument("--router-url", default=None,
                   help="a router's registration address (tcp://host:port) to announce this worker to")
    p.add_argument("--worker-id", default=None, help="name in the router's metrics (default: random)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests that may wait for KV cache space; more are refused (the router answers 429 "
                        "with Retry-After). 0: no bound")
    p.add_argument("--router-timeout", type=float, default=60.0,
                   help="seconds a router that said Hello may stay silent before it counts as gone and the "
                        "requests it sent are aborted (routers greet every few seconds)")
    p.add_argument("--drain-timeout", type=float, default=20.0,
                   help="on SIGTERM, seconds to finish the requests in flight (taking no new ones) before "
                        "exiting; keep it under the orchestrator's grace period. 0: stop at once (as SIGINT does)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--log-level", default="info")
    return p


def add_transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transfer-backend", choices=["tcp", "nccl"], default="tcp",
                   help="how KV moves between prefill and decode workers")
    p.add_argument("--transfer-timeout", type=float, default=30.0,
                   help="seconds a request's KV transfer may take before it fails and its pages are freed")


def worker_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of every Worker class from the shared flags."""
    return {"router_url": args.router_url, "advertise_host": args.advertise_host or None,
            "max_queued_requests": args.max_queued_requests, "router_timeout": args.router_timeout,
            "drain_timeout": args.drain_timeout}


def run(args: argparse.Namespace, make_worker: Callable) -> None:
    """Build the engine from the flags, then the worker with make_worker(engine, address, worker_id, args)."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from mixquant_serve.engine.engine import Engine

    config = dataclass_from_args(EngineConfig, args)
    worker_id = args.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    try:
        engine = Engine(config=config)
    except ConfigError as e:
        print(f"[{worker_id}] cannot start: {e}", file=sys.stderr)
        sys.exit(2)
    worker = make_worker(engine, f"tcp://{args.host}:{args.port or '*'}", worker_id, args)
    print(f"[{worker_id}] {worker.role} worker ready on {worker.address} (pid {os.getpid()})", flush=True)
    worker.run()


def main(argv: list[str] | None = None) -> None:
    from mixquant_serve.worker.loop import Worker

    args = parser("python -m mixquant_serve.worker", "A colocated worker: one engine running both phases.") \
        .parse_args(argv)

    run(args, lambda engine, address, worker_id, a: Worker(engine, address, worker_id, **worker_options(a)))
