"""Command line of a worker process: engine flags plus where to listen."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid

import torch

from mixquant_serve.cli_args import add_engine_args, dataclass_from_args
from mixquant_serve.config import ConfigError, EngineConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixquant_serve.worker", description=__doc__)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address the control port binds to (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="control port (0: any free port, printed at start)")
    p.add_argument("--worker-id", default=None, help="name in the router's metrics (default: random)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from mixquant_serve.engine.engine import Engine
    from mixquant_serve.worker.loop import Worker

    config = dataclass_from_args(EngineConfig, args)
    worker_id = args.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    try:
        engine = Engine(config=config)
    except ConfigError as e:
        print(f"[{worker_id}] cannot start: {e}", file=sys.stderr)
        sys.exit(2)
    worker = Worker(engine, f"tcp://{args.host}:{args.port or '*'}", worker_id)
    print(f"[{worker_id}] ready on {worker.address} (pid {os.getpid()})", flush=True)
    worker.run()
