"""The router's configuration and its promise never to import torch or transformers."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest
from conftest import REPO

from router.args import RouterConfig, parse_args


def test_parser_defaults_come_from_the_dataclass(tmp_path) -> None:
    cfg = parse_args(["--model-path", str(tmp_path), "--worker-urls", "tcp://a:1, tcp://b:2"])
    defaults = RouterConfig()
    for f in fields(RouterConfig):
        if f.name not in ("model_path", "worker_urls", "api_key"):
            assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name
    assert cfg.worker_urls == ("tcp://a:1", "tcp://b:2")
    assert cfg.static_workers == [("tcp://a:1", "colocated"), ("tcp://b:2", "colocated")]
    assert cfg.model_name == tmp_path.name
    slash = parse_args(["--model-path", str(tmp_path) + "/", "--worker-urls", "tcp://a:1"])
    assert slash.model_name == tmp_path.name


def test_parser_reads_every_flag(tmp_path) -> None:
    cfg = parse_args(["--model-path", str(tmp_path), "--worker-urls", "tcp://a:1", "--host", "0.0.0.0",
                      "--port", "9001", "--served-model-name", "m", "--chat-template", "t.jinja",
                      "--max-request-bytes", "10", "--max-pending-requests", "3", "--worker-timeout", "2.5",
                      "--log-level", "DEBUG", "--prefill-urls", "tcp://p:1", "--decode-urls", "tcp://d:1,tcp://d:2",
                      "--registry-port", "7000", "--policy", "round_robin",
                      "--session-ttl", "30", "--overload-threshold", "9", "--balance-margin", "0",
                      "--local-prefill-max-tokens", "64",
                      "--api-key", "k1,k2", "--rate-limit", "2.5", "--rate-limit-burst", "5",
                      "--reasoning-parser", "qwen3"])
    assert (cfg.host, cfg.port, cfg.model_name, cfg.chat_template) == ("0.0.0.0", 9001, "m", "t.jinja")
    assert (cfg.max_request_bytes, cfg.max_pending_requests, cfg.worker_timeout) == (10, 3, 2.5)
    assert cfg.log_level == "debug"
    assert cfg.static_workers == [("tcp://a:1", "colocated"), ("tcp://p:1", "prefill"),
                                  ("tcp://d:1", "decode"), ("tcp://d:2", "decode")]
    assert (cfg.registry_port, cfg.policy, cfg.session_ttl) == (7000, "round_robin", 30)
    assert cfg.overload_threshold == 9
    assert (cfg.balance_margin, cfg.local_prefill_max_tokens) == (0, 64)
    assert (cfg.api_key, cfg.rate_limit, cfg.rate_limit_burst) == (("k1", "k2"), 2.5, 5)
    assert cfg.reasoning_parser == "qwen3"


def test_api_keys_from_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MIXQUANT_API_KEY", "a, b")
    argv = ["--model-path", str(tmp_path), "--registry-port", "1"]
    assert parse_args(argv).api_key == ("a", "b")
    assert parse_args([*argv, "--api-key", "c"]).api_key == ("c",)


@pytest.mark.parametrize("argv", [
    ["--worker-urls", "tcp://a:1"],
    ["--model-path", "/no/such/dir", "--worker-urls", "tcp://a:1"],
    ["--model-path", "."],  # no worker and no registration socket
    ["--model-path", ".", "--prefill-urls", "tcp://p:1"],  # nobody to answer
    ["--model-path", ".", "--worker-urls", "tcp://a:1", "--policy", "random"],
    ["--model-path", ".", "--worker-urls", "tcp://a:1", "--session-ttl", "-1"],
])
def test_parser_rejects_bad_input(argv: list[str], monkeypatch) -> None:
    monkeypatch.delenv("MIXQUANT_API_KEY", raising=False)
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_router_never_imports_torch(tokenizer_dir) -> None:
    code = (
        "import sys\n"
        "import router.app\n"
        "from router.args import RouterConfig\n"
        f"cfg = RouterConfig(model_path={str(tokenizer_dir)!r}, worker_urls=('tcp://127.0.0.1:9',))\n"
        "router.app.create_app(cfg)\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
