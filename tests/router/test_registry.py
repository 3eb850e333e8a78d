"""Workers that register themselves on the router's registration socket (no static list)."""

from __future__ import annotations

import pickle

import httpx
import zmq
from conftest import RouterProcess, free_port, wait_for
from scripted_worker import ScriptedWorker

from mixquant_serve.protocol.channels import encode
from mixquant_serve.protocol.messages import Register


def test_workers_register_and_serve(tokenizer, tokenizer_dir, tmp_path) -> None:
    port = free_port()
    router = RouterProcess(tokenizer_dir, [], tmp_path / "router.log", "--registry-port", str(port),
                           "--served-model-name", "m", "--worker-timeout", "1.0")
    url = f"tcp://127.0.0.1:{port}"
    workers = []
    try:
        router.wait_ready(healthy=False)
        assert httpx.get(router.base + "/health").status_code == 503  # nobody registered yet
        junk = zmq.Context.instance().socket(zmq.DEALER)
        junk.connect(url)
        junk.send(pickle.dumps({"url": "tcp://127.0.0.1:1", "role": "decode"}))  # never unpickled
        junk.send(encode(Register(url="http://127.0.0.1:2", role="decode")))  # not a ZMQ address
        junk.send(encode(Register(url="tcp://127.0.0.1:3", role="oracle")))  # no such role
        workers = [ScriptedWorker(tokenizer, "p0", heartbeat_s=0.1, role="prefill", router_url=url).start(),
                   ScriptedWorker(tokenizer, "d0", heartbeat_s=0.1, role="decode", router_url=url).start()]
        wait_for(lambda: httpx.get(router.base + "/health").status_code == 200, 5)
        wait_for(lambda: all(w["healthy"] for w in httpx.get(router.base + "/workers").json()), 5)
        snapshot = {w["worker_id"]: w for w in httpx.get(router.base + "/workers").json()}
        assert set(snapshot) == {"p0", "d0"}  # the junk registrations added nothing
        assert all(w["registered"] for w in snapshot.values())
        assert (snapshot["p0"]["role"], snapshot["d0"]["role"]) == ("prefill", "decode")
        assert snapshot["p0"]["url"] == workers[0].address
        r = router.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2)
        (req,) = workers[1].generate_reqs()
        assert req.rid == r.id and req.prefill_url == workers[0].address
        junk.close(0)
        assert router.proc.poll() is None
    finally:
        router.stop()
        for w in workers:
            w.stop()


def test_the_role_a_worker_reports_wins(tokenizer, tokenizer_dir, tmp_path) -> None:
    port = free_port()
    router = RouterProcess(tokenizer_dir, [], tmp_path / "router.log", "--registry-port", str(port),
                           "--served-model-name", "m")
    worker = ScriptedWorker(tokenizer, "d9", heartbeat_s=0.1, role="decode").start()
    try:
        router.wait_ready(healthy=False)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(encode(Register(url=worker.address, role="prefill")))  # announced wrongly
        wait_for(lambda: httpx.get(router.base + "/health").status_code == 200, 5)
        (snap,) = httpx.get(router.base + "/workers").json()
        assert snap["role"] == "decode" and snap["healthy"]
        sock.close(0)
    finally:
        router.stop()
        worker.stop()
