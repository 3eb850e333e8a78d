"""Sampling parameters: one struct shared by the offline API, the control channel and the router.

It is a msgspec Struct so that it crosses sockets as msgpack without conversion; it imports no torch.
"""

from __future__ import annotations

import json

import msgspec

MAX_TOP_LOGPROBS = 20


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What to generate and when to stop (OpenAI and vLLM semantics).

    temperature 0 means greedy. max_tokens None means "up to the context length".
    logprobs None returns none; k >= 0 returns the sampled token's logprob and the top k.
    """

    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # structured output: every sampled token keeps the text a prefix of a document matching this JSON
    # Schema (text); '{"type": "object"}' is OpenAI's json_object mode
    json_schema: str | None = None
    # the same for any llguidance grammar (Lark syntax, `%json {...}` inline schemas allowed): the router's
    # tool-call grammars (router.tool_grammar). At most one of json_schema and grammar is set.
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = [
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be non-negative"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must not exceed max_tokens"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "must be in [0, 2]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1 or 0 (off) or a positive count"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 2.0, "must be in (0, 2]"),
            ("stop", len(self.stop) <= 16 and all(self.stop), "at most 16 non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"must be in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        if self.json_schema is not None:
            checks.append(("json_schema", _is_json_object(self.json_schema), "must be a JSON Schema object"))
        if self.grammar is not None:
            checks.append(("grammar", bool(self.grammar.strip()) and self.json_schema is None,
                           "must be non-empty and not combined with json_schema"))
        for field, ok, why in checks:
            if not ok:
                raise InvalidSamplingParams(field, f"{field} {why} (got {getattr(self, field)!r})")


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class InvalidSamplingParams(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
