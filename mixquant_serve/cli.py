"""The `mixquant-serve` command: `launch` a local cluster, `quantize` a checkpoint to NVFP4."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from mixquant_serve.cli_args import add_engine_args, dataclass_from_args
from mixquant_serve.config import ConfigError, EngineConfig, ModelConfig


def _launch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="start the router and workers on this machine",
                       description="Start the router and the workers on this machine; Ctrl-C stops them.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds to")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated",
                   help="disaggregated: prefill and decode workers, KV moved between them; "
                        "colocated: each worker runs both phases")
    p.add_argument("--workers", type=int, default=1, help="number of colocated workers")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--transfer-backend", choices=["tcp", "nccl"], default=None,
                   help="KV transfer between workers (default: nccl with GPUs, else tcp)")
    p.add_argument("--transfer-timeout", type=float, default=None,
                   help="seconds of silence after which a KV transfer fails (worker flag)")
    p.add_argument("--policy", default=None, help="router placement policy (affinity, round_robin)")
    p.add_argument("--local-prefill-max-tokens", type=int, default=None,
                   help="a decode worker prefills deltas shorter than this itself (router flag)")
    p.add_argument("--api-key", default=None, help="require this bearer key on /v1/* (router flag)")
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="seconds without a heartbeat after which the router counts a worker unhealthy (router flag)")
    p.add_argument("--tool-call-constraint", choices=["all", "strict"], default=None,
                   help="tool_choice auto: hold every call to its schema, or only strict functions' (router flag)")
    p.add_argument("--threads-per-worker", type=int, default=0,
                   help="torch CPU threads per worker (0: the cores divided among the workers)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file overriding the model's")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.set_defaults(func=launch)


def launch(args: argparse.Namespace) -> int:
    from mixquant_serve.launcher import Cluster, ClusterSpec, banner
    from mixquant_serve.models.embedded import resolve_model_path
    from mixquant_serve.models.registry import check_architecture

    engine = dataclass_from_args(EngineConfig, args)
    try:
        engine.validate()
        engine = dataclasses.replace(engine, model_path=resolve_model_path(engine.model_path or None))
        check_architecture(ModelConfig.from_path(engine.model_path))
    except ConfigError as e:
        print(f"mixquant-serve: {e}", file=sys.stderr)
        return 2
    router_args = []
    for flag in ("chat_template", "policy", "local_prefill_max_tokens", "api_key", "worker_timeout",
                 "tool_call_constraint"):
        if (value := getattr(args, flag)) is not None:
            router_args += ["--" + flag.replace("_", "-"), str(value)]
    backend = args.transfer_backend or ("nccl" if engine.device == "cuda" or _has_gpu() else "tcp")
    spec = ClusterSpec(engine, args.host, args.port, args.mode, args.workers, args.prefill_workers,
                       args.decode_workers, backend, args.threads_per_worker, router_args,
                       transfer_timeout=args.transfer_timeout)
    cluster = Cluster(spec)
    print(f"[mixquant] starting router on {cluster.url} and {spec.num_workers} {spec.mode} worker(s) of "
          f"{engine.model_path}", flush=True)
    cluster.start()
    try:
        cluster.wait_ready(args.startup_timeout)
        model = engine.served_model_name or os.path.basename(os.path.normpath(engine.model_path))
        print(banner(cluster.url, model, spec), flush=True)
        return cluster.serve_forever()
    except (RuntimeError, KeyboardInterrupt) as e:
        print(f"mixquant-serve: {e or 'interrupted'}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


def _has_gpu() -> bool:
    from mixquant_serve.launcher import _gpu_count

    return _gpu_count() > 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mixquant-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    _launch_parser(sub)
    from mixquant_serve.quant.quantize_cli import add_parser as add_quantize_parser

    add_quantize_parser(sub)
    args = parser.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
