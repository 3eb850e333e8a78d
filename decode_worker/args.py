"""Command line of the decode worker: the shared worker flags plus the transfer backend."""

from __future__ import annotations

import argparse

from mixquant_serve.worker.args import add_transfer_args, parser, run, worker_options


def main(argv: list[str] | None = None) -> None:
    from decode_worker.worker import DecodeWorker

    p = parser("python -m decode_worker", "Decode worker: receives prefilled KV, decodes in BF16.")
    add_transfer_args(p)
    p.add_argument("--transfer-host", default=None,
                   help="address the KV receiver binds to and advertises (default: --advertise-host or --host)")
    p.set_defaults(prefill_precision="bf16", decode_precision="bf16")
    args = p.parse_args(argv)

    def make(engine, address: str, worker_id: str, a: argparse.Namespace) -> DecodeWorker:
        host = a.transfer_host or a.advertise_host or a.host
        return DecodeWorker(engine, address, worker_id, backend=a.transfer_backend, transfer_host=host,
                            transfer_timeout=a.transfer_timeout, **worker_options(a))

    run(args, make)
