"""Structured output: a grammar compiled from a JSON Schema masks the logits of every step (llguidance).

The mask allows exactly the tokens that keep the output a prefix of a matching document (and EOS once it
is complete); after each sampled token the request's matcher advances. Grammars are compiled per request;
the tokenizer view llguidance needs is built once per engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixquant_serve.tokenizer import Tokenizer


class GrammarError(ValueError):
    """A schema that cannot be compiled; the message is llguidance's."""


class Grammars:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, list(eos_ids)
        self._ll_tokenizer = None
        self._bits = torch.arange(32, dtype=torch.int32)

    def _tok(self):
        if self._ll_tokenizer is None:
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.to_json(), n_vocab=self.vocab_size,
                                                        eos_token=self.eos_ids or None)
        return self._ll_tokenizer

    def matcher(self, json_schema: str):
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json_schema)
        except ValueError as e:
            raise GrammarError(f"json_schema: {e}") from None
        m = llguidance.LLMatcher(self._tok(), grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"json_schema: {m.get_error()}")
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
