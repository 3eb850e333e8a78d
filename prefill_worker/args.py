"""Command line of the prefill worker: the shared worker flags plus the transfer backend."""

from __future__ import annotations

import argparse

from mixquant_serve.worker.args import add_transfer_args, parser, run, worker_options


def main(argv: list[str] | None = None) -> None:
    from prefill_worker.worker import PrefillWorker

    p = parser("python -m prefill_worker", "Prefill worker: computes prompt KV and pushes it to decode workers.")
    add_transfer_args(p)
    args = p.parse_args(argv)

    def make(engine, address: str, worker_id: str, a: argparse.Namespace) -> PrefillWorker:
        return PrefillWorker(engine, address, worker_id, backend=a.transfer_backend,
                             transfer_timeout=a.transfer_timeout, **worker_options(a))

    run(args, make)
