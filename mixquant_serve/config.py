"""Configuration: frozen dataclasses. "auto" values are resolved with dataclasses.replace.

This module is a leaf: it imports neither torch nor anything else from the project.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PRECISIONS = ("bf16", "fp8", "nvfp4")
DTYPES = ("auto", "bfloat16", "float16", "float32")


class ConfigError(ValueError):
    """A configuration or model folder that cannot be served; the message names the cause."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the engine needs, read from a Hugging Face `config.json`."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    checkpoint_dtype: str = "bfloat16"

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"model path {str(folder)!r} is not a folder")
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"model folder {str(folder)!r} has no config.json")
        return cls.from_dict(json.loads(cfg_file.read_text()), str(folder), _read_generation_eos(folder))

    @classmethod
    def from_dict(cls, hf: Mapping[str, Any], path: str = "", extra_eos: tuple[int, ...] = ()) -> ModelConfig:
        archs = hf.get("architectures") or []
        if not archs:
            raise ConfigError(f"config.json of {path!r} names no architecture ('architectures' is missing)")
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                path=path,
                architecture=archs[0],
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=None if rope_type == "default" else rope,
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", archs[0].startswith("Qwen2"))),
                qk_norm=archs[0].startswith("Qwen3"),
                hidden_act=str(hf.get("hidden_act", "silu")),
                eos_token_ids=tuple(dict.fromkeys(eos_ids + extra_eos)),
                bos_token_id=hf.get("bos_token_id"),
                checkpoint_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json of {path!r} lacks the field {e.args[0]!r}") from None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _read_generation_eos(folder: Path) -> tuple[int, ...]:
    gen = folder / "generation_config.json"
    if not gen.is_file():
        return ()
    eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@dataclass(frozen=True)
class KVLayout:
    """What a KV page holds; two workers may exchange pages only if their layouts are equal."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str

    def mismatch(self, other: KVLayout) -> str | None:
        """Name the first field that differs, or None."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                return f"{f.name}: {a} here vs {b} there"
        return None


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine (one worker process) needs. argparse takes its defaults from here."""

    model_path: str = ""
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    # precision of each phase (Mix-Quant: quantized prefill, precise decode)
    prefill_precision: str = "nvfp4"
    decode_precision: str = "bf16"
    quantized_model_path: str | None = None
    # KV cache
    page_size: int = 16
    max_total_tokens: int | None = None
    cpu_kv_cache_gb: float = 2.0
    mem_fraction_static: float = 0.85
    enable_prefix_caching: bool = True
    # scheduling ("auto" (None) values depend on the device: see engine.resolve_config)
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None
    context_length: int | None = None
    attention_backend: str = "auto"
    # CUDA graphs of the decode step, captured for batch sizes up to cuda_graph_max_bs
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None
    # prompt batches of up to this many tokens replay CUDA graphs of everything but attention
    # (None: 4096 on CUDA, capped by chunked_prefill_size + max_running_requests; 0: off; off with
    # disable_cuda_graph)
    piecewise_cuda_graph_max_tokens: int | None = None
    # launch each decode step before reading the previous one's tokens (None: on for CUDA, off on CPU)
    overlap_schedule: bool | None = None
    # decode rows ride along prompt batches that run in the decode precision (BF16 tails, and prefill chunks
    # when the prefill precision is the decode one) instead of alternating with them (None: on for CUDA)
    enable_mixed_chunk: bool | None = None
    # Mix-Quant: the last N prompt tokens of each request run in the decode precision (on the decode worker
    # when disaggregated); 1 is the last token only, the paper's split
    bf16_tail_tokens: int = 16
    # Mix-Quant: during prefill in another precision, the k and v columns of every qkv projection come from
    # the decode precision's weights, so the prompt KV that decode reads carries no quantized-projection error.
    # None: on for NVFP4 prefill, off for FP8 (whose KL is within bounds without it and which is there for
    # speed). With bf16_tail_tokens 16 this is the default picked from the sweeps in benchmarks/RESULTS.md
    # (issue 12)
    bf16_kv_proj: bool | None = None
    # FP8 GEMMs on CUDA accumulate without float32 promotion (quant/fp8.py; process-wide); measured in
    # benchmarks/RESULTS.md ("FP8 fast accumulation"): ~1.1x the GEMMs; relative error against exact
    # arithmetic 2.1e-3 (K 4096) / 3.1e-3 (K 12288) instead of 1.7e-3
    fp8_fast_accum: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        for phase in ("prefill", "decode"):
            p = getattr(self, f"{phase}_precision")
            if p not in PRECISIONS:
                raise ConfigError(f"--{phase}-precision must be one of {PRECISIONS}, got {p!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"--page-size must be a power of two, got {self.page_size}")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size < self.page_size:
            raise ConfigError("--chunked-prefill-size must be at least one page")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ConfigError("--max-running-requests must be at least 1")
        if self.piecewise_cuda_graph_max_tokens is not None and self.piecewise_cuda_graph_max_tokens < 0:
            raise ConfigError("--piecewise-cuda-graph-max-tokens must be 0 (off) or more")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 1:
            raise ConfigError("--cuda-graph-max-bs must be at least 1")
        if self.bf16_tail_tokens < 1:
            raise ConfigError(f"--bf16-tail-tokens must be at least 1, got {self.bf16_tail_tokens}")

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions whose weights this engine holds, decode first."""
        return tuple(dict.fromkeys((self.decode_precision, self.prefill_precision)))

    @property
    def wants_bf16_kv_proj(self) -> bool:
        """--bf16-kv-proj as set, or its default: on for NVFP4 prefill (never for BF16 prefill)."""
        wanted = self.prefill_precision == "nvfp4" if self.bf16_kv_proj is None else self.bf16_kv_proj
        return wanted and self.prefill_precision != "bf16"

    @property
    def kv_proj_precision(self) -> str | None:
        """What prefill computes the qkv projections' k/v columns in when not its own precision: BF16 with
        bf16_kv_proj, if this engine holds BF16 weights (either phase in BF16); else None."""
        if self.wants_bf16_kv_proj and "bf16" in self.precisions:
            return "bf16"
        return None

    @property
    def mixed_precision(self) -> bool:
        return self.prefill_precision != self.decode_precision
