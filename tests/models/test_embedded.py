"""The embedded model's converted folder carries its model card's sampling defaults (temperature 0.2, top_p 0.9);
a folder converted by an older version gets them in place, without converting again; a request's fields win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixquant_serve.models import embedded
from router.openai_api import ChatCompletionRequest
from router.params import SamplingDefaults, base_params

OLD_GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def old_conversion(cache: Path) -> Path:
    """A folder as version 1 left it: complete, no .version, no sampling fields."""
    folder = cache / "models" / embedded.EMBEDDED_NAME
    folder.mkdir(parents=True)
    (folder / "generation_config.json").write_text(json.dumps(OLD_GENERATION_CONFIG))
    (folder / "model.safetensors").write_bytes(b"weights stay as they are")
    (folder / ".complete").write_text("SmolLM2-135M-Instruct.Q4_1.gguf")
    return folder


def test_an_old_conversion_is_upgraded_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXQUANT_CACHE", str(tmp_path))
    folder = old_conversion(tmp_path)
    monkeypatch.setattr(embedded, "_convert", lambda *a: pytest.fail("a complete folder was converted again"))
    assert embedded.embedded_model_path() == folder
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"], gen["do_sample"]) == (0.2, 0.9, True)
    assert (gen["eos_token_id"], gen["bos_token_id"]) == (2, 1)  # the rest is kept
    assert (folder / "model.safetensors").read_bytes() == b"weights stay as they are"
    assert (folder / ".version").read_text().strip() == str(embedded.FORMAT_VERSION)
    before = (folder / "generation_config.json").stat().st_mtime_ns
    assert embedded.embedded_model_path() == folder
    assert (folder / "generation_config.json").stat().st_mtime_ns == before  # up to date: left alone


def test_the_router_uses_them_and_requests_still_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXQUANT_CACHE", str(tmp_path))
    old_conversion(tmp_path)
    folder = str(embedded.embedded_model_path())
    defaults = SamplingDefaults.load(folder, "model")
    assert (defaults.temperature, defaults.top_p) == (0.2, 0.9)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    p = base_params(ChatCompletionRequest(messages=msgs), None, None, defaults=defaults)
    assert (p.temperature, p.top_p) == (0.2, 0.9)
    p = base_params(ChatCompletionRequest(messages=msgs, temperature=0.8, top_p=1.0), None, None, defaults=defaults)
    assert (p.temperature, p.top_p) == (0.8, 1.0)
    assert SamplingDefaults.load(folder, "openai") == SamplingDefaults()


def test_a_fresh_conversion_has_them(smollm_path: str) -> None:
    gen = json.loads((Path(smollm_path) / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"]) == (0.2, 0.9)
    assert (Path(smollm_path) / ".version").read_text().strip() == str(embedded.FORMAT_VERSION)
