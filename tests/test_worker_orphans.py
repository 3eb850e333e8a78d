"""A worker aborts the requests of a router that has gone silent (killed, or reconnected under a new socket
identity: either way no one can receive their outputs), and only those: a router that keeps greeting keeps
its requests, even across a stretch in which the worker itself was stopped and read nothing. The test
plays the router over ZMQ (tests/cluster.py WorkerProc) against a real colocated worker."""

from __future__ import annotations

import signal
import time

from cluster import WorkerProc

from mixquant_serve.protocol.messages import Hello
from mixquant_serve.sampling_params import SamplingParams

TIMEOUT_S = 1.5
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


def _greet_for(w: WorkerProc, seconds: float, rid: str | None = None) -> None:
    """Greet every 0.2 s (a router greets every few seconds) for `seconds`, or until `rid` has finished."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (rid and w.outputs.get(rid) and w.outputs[rid][-1].finished):
        w.link.send(Hello(router_id="test"))
        w.pump(0.2)


def test_only_a_silent_routers_requests_are_aborted(smollm_path):
    w = WorkerProc("mixquant_serve.worker", "--model-path", smollm_path, "--context-length", "512",
                   "--max-total-tokens", "2048", "--router-timeout", str(TIMEOUT_S), name="orphans").wait_ready()
    try:
        ids = list(range(20, 60))
        # stopped for twice the timeout while this router keeps greeting: its request survives (regression:
        # the silence was measured to the wake-up, before the greetings sent meanwhile had been read)
        w.submit("kept", ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        w.pump(0.3)
        w.proc.send_signal(signal.SIGSTOP)
        try:
            _greet_for(w, 2 * TIMEOUT_S)
        finally:
            w.proc.send_signal(signal.SIGCONT)
        _greet_for(w, 120, "kept")
        tokens, final = w.result("kept", timeout=1)
        assert final.finish_reason == "length" and len(tokens) == 12, final
        # now the router goes quiet with a long request running: it is aborted after about the timeout
        w.submit("orphan", ids, LONG)
        start = time.monotonic()
        _, final = w.result("orphan", timeout=60)  # the abort is still addressed to the router that asked
        assert final.finish_reason == "abort" and final.completion_tokens < 400, final
        assert time.monotonic() - start < 40
        w.link.send(Hello(router_id="test"))  # a forgotten router gets heartbeats again once it greets
        stats = w.fresh_stats()
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert stats.free_pages + stats.cached_pages == stats.total_pages
        assert stats.counters["orphans_aborted"] == 1 and stats.counters["requests_aborted"] == 1
    finally:
        w.stop()
