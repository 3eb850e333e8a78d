"""Structured output: a grammar masks the logits of every step (llguidance).

The grammar is a request's JSON Schema (`response_format`, written in JSON_STYLE) or an llguidance grammar
in Lark syntax (the router's tool-call grammars). The mask allows exactly the tokens that keep the output a
prefix of a matching document (and EOS once it is complete); after each sampled token the request's matcher
advances. Grammars are compiled per request; the tokenizer view llguidance needs is built once per engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from mixquant_serve.sampling_params import SamplingParams
from mixquant_serve.tokenizer import Tokenizer

# JSON as `json.dumps` writes it (", " and ": ", no other whitespace): free whitespace lets a model fill its
# tokens with blank lines. A schema's own "x-guidance" options win.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar that cannot be compiled; the message is llguidance's, `param` the request field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def llguidance_tokenizer_json(tokenizer_json: str) -> str:
    """The tokenizer.json llguidance should read. A decoder Sequence that holds ByteLevel (GGUF conversions
    write ByteFallback + ByteLevel) would be read as byte-fallback, mapping "Ġ"/"Ċ" tokens to the wrong bytes
    (no space or newline could match a grammar); a byte-level vocabulary gets a plain ByteLevel decoder."""
    tj = json.loads(tokenizer_json)
    decoder = tj.get("decoder") or {}
    parts = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else []
    byte_level = [d for d in parts if isinstance(d, dict) and d.get("type") == "ByteLevel"]
    if not byte_level:
        return tokenizer_json
    tj["decoder"] = byte_level[0]
    return json.dumps(tj)


def grammar_of(params: SamplingParams) -> tuple[str, str] | None:
    """(llguidance grammar, the request field it came from) of a request, or None if unconstrained."""
    if params.grammar is not None:
        return params.grammar, "grammar"
    if params.json_schema is not None:
        import llguidance

        try:
            return llguidance.LLMatcher.grammar_from_json_schema(params.json_schema, JSON_STYLE), "response_format"
        except ValueError as e:
            raise GrammarError(f"json_schema: {e}", "response_format") from None
    return None


class Grammars:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, list(eos_ids)
        self._ll_tokenizer = None
        self._bits = torch.arange(32, dtype=torch.int32)

    def _tok(self):
        if self._ll_tokenizer is None:
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(llguidance_tokenizer_json(self.tokenizer.to_json()),
                                                        n_vocab=self.vocab_size, eos_token=self.eos_ids or None)
        return self._ll_tokenizer

    def matcher(self, params: SamplingParams):
        """A fresh matcher for the request's grammar, or None when it has none."""
        found = grammar_of(params)
        if found is None:
            return None
        import llguidance

        grammar, param = found
        m = llguidance.LLMatcher(self._tok(), grammar, log_level=0)
        if m.is_error():
            label = "json_schema" if param == "response_format" else param
            raise GrammarError(f"{label}: {m.get_error()}", param)
        return m

    def allowed(self, matcher) -> torch.Tensor:
        """Bool [vocab_size]: the tokens the matcher accepts next. (llguidance.torch's own mask kernel is
        torch.compile'd, which needs a C++ compiler on CPU; this is the same bit unpacking, uncompiled.)"""
        packed = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        return ((packed.unsqueeze(1) >> self._bits) & 1).flatten()[: self.vocab_size].bool()

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, rows: Sequence[tuple[int, object]]) -> None:
        """Mask logits[row] in place for each (row, matcher)."""
        for row, matcher in rows:
            logits[row].masked_fill_(~self.allowed(matcher).to(logits.device), float("-inf"))
