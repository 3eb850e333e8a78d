"""Data shipped with mixquant-serve (JSONL, one record a line).

- calibration.jsonl: texts for NVFP4 calibration (`mixquant-serve quantize`): {"text": ...} or
  {"messages": [...]} (rendered with the model's chat template).
- agent_conversations.jsonl: multi-turn tool-using agent conversations for the accuracy harness
  (benchmarks/accuracy.py): {"id", "system", "tools", "messages"}; assistant messages may carry
  "tool_calls" [{"name", "arguments"}], tool results are {"role": "tool", "name", "content"}.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def read_jsonl(name: str) -> list[dict[str, Any]]:
    """The records of a shipped JSONL file, e.g. read_jsonl("calibration.jsonl")."""
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
