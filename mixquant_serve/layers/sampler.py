"""Batched token sampler: one call turns a step's logits [B, V] into one token per request.

Order per row (vLLM/OpenAI semantics):
  1. logprobs come from log_softmax of the raw logits (before anything below);
  2. while fewer than min_tokens were generated, stop tokens get -inf;
  3. repetition (prompt + output), frequency and presence (output) penalties;
  4. temperature 0 is greedy argmax; otherwise divide by temperature, apply top-k, top-p, min-p, and draw.
Draws use one uniform number per row, taken on the CPU from the row's own generator (seeded rows) or
the global CPU generator, and mapped through the row's cumulative distribution, so a seed gives the
same tokens on every device. The filters are public pure functions so the tests can check each one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from mixquant_serve.protocol.messages import TokenLogprob
from mixquant_serve.sampling_params import SamplingParams

# Temperatures below this are treated as greedy (dividing by them only amplifies float noise).
GREEDY_EPS = 1e-5

Rows = slice | torch.Tensor


class SamplingRow(Protocol):
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    stop_token_set: frozenset[int]


class SampleOutput(NamedTuple):
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Stateless; one instance per engine."""

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        raw = logits.float()
        if all(_plain_greedy(r) for r in rows):
            return SampleOutput(raw.argmax(dim=-1).tolist(), [None] * len(rows))
        work = _finite(apply_penalties(mask_stop_tokens(raw.clone(), rows), rows))
        tokens = _choose(work, rows)
        token_ids = tokens.tolist()
        return SampleOutput(token_ids, _logprobs(raw, tokens, token_ids, rows))

    def sample_on_device(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """[B] token ids left on the logits' device, no host sync: for rows without penalties, an active
        min_tokens or logprobs (the caller checks), whose sampling needs nothing but the logits."""
        raw = logits.float()
        if all(is_greedy(r.params) for r in rows):
            return raw.argmax(dim=-1)
        return _choose(_finite(raw.clone()), rows)


def _plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return is_greedy(p) and p.logprobs is None and not uses_penalties(p) and not _min_tokens_active(row)


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_EPS


def uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _min_tokens_active(row: SamplingRow) -> bool:
    return len(row.output_ids) < row.params.min_tokens and bool(row.stop_token_set)


def _select(picked: list[int], n: int, device: torch.device) -> Rows:
    """An index for the picked rows: a full slice (a view, no copy) when every row is picked."""
    if len(picked) == n:
        return slice(None)
    return torch.tensor(picked, dtype=torch.long, device=device)


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row parameters as a [n, 1] column on the logits' device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def mask_stop_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """In place: -inf on stop tokens of rows that have not reached min_tokens yet. Returns logits."""
    vocab = logits.shape[1]
    pairs = [(i, t) for i, r in enumerate(rows) if _min_tokens_active(r) for t in r.stop_token_set]
    pairs = [(i, t) for i, t in pairs if t < vocab]
    if pairs:
        index = torch.tensor(pairs, dtype=torch.long, device=logits.device).T
        logits[index[0], index[1]] = float("-inf")
    return logits


def token_counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), vocab] float32: how often each token occurs in each sequence."""
    counts = torch.zeros(len(seqs), vocab, dtype=torch.float32, device=device)
    lengths = [len(s) for s in seqs]
    total = sum(lengths)
    if total:
        # numpy turns long python lists into arrays ~10x faster than torch.tensor does
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total)
        which = np.repeat(np.arange(len(seqs), dtype=np.int64), lengths)
        index = torch.from_numpy(np.stack([which, flat])).to(device)
        counts.index_put_((index[0], index[1]), torch.ones(total, device=device), accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """In place on the rows that use penalties; returns logits. No work when no row does.

    repetition_penalty r over prompt + output tokens: positive logits / r, negative ones * r.
    Then logit -= frequency_penalty * count_in_output + presence_penalty * (count_in_output > 0).
    """
    picked = [i for i, r in enumerate(rows) if uses_penalties(r.params)]
    if not picked:
        return logits
    index = _select(picked, len(rows), logits.device)
    chosen = [rows[i] for i in picked]
    sub = logits[index]
    out_counts = token_counts([r.output_ids for r in chosen], sub.shape[1], sub.device)
    rep = [r.params.repetition_penalty for r in chosen]
    if any(x != 1.0 for x in rep):
        seen = (token_counts([r.prompt_ids for r in chosen], sub.shape[1], sub.device) + out_counts) > 0
        r_col = _column(rep, sub)
        sub = torch.where(seen, torch.where(sub > 0, sub / r_col, sub * r_col), sub)
    freq = _column([r.params.frequency_penalty for r in chosen], sub)
    pres = _column([r.params.presence_penalty for r in chosen], sub)
    logits[index] = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
    return logits


def apply_top_k(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """In place: keep each row's top_k largest logits (ties at the k-th kept); k <= 0 or >= V is off."""
    vocab = logits.shape[1]
    picked = [i for i, k in enumerate(top_k) if 0 < k < vocab]
    if not picked:
        return logits
    index = _select(picked, len(top_k), logits.device)
    ks = [top_k[i] for i in picked]
    sub = logits[index]
    kth_pos = torch.tensor(ks, dtype=torch.long, device=sub.device).unsqueeze(1) - 1
    kth = sub.topk(max(ks), dim=-1).values.gather(1, kth_pos)
    logits[index] = sub.masked_fill(sub < kth, float("-inf"))
    return logits


def apply_top_p(logits: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """In place: keep the smallest most-probable set whose probability reaches top_p (1.0 is off)."""
    picked = [i for i, p in enumerate(top_p) if p < 1.0]
    if not picked:
        return logits
    index = _select(picked, len(top_p), logits.device)
    sub = logits[index]
    probs, order = sub.softmax(dim=-1).sort(dim=-1, descending=True)
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= _column([top_p[i] for i in picked], probs)
    drop_sorted[:, 0] = False  # the top token always stays, also for a top_p that rounds to 0 in this dtype
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    logits[index] = sub.masked_fill(drop, float("-inf"))
    return logits


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """In place: drop tokens whose probability is below min_p times the row's largest (0.0 is off)."""
    picked = [i for i, p in enumerate(min_p) if p > 0.0]
    if not picked:
        return logits
    index = _select(picked, len(min_p), logits.device)
    sub = logits[index]
    probs = sub.softmax(dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * _column([min_p[i] for i in picked], probs)
    logits[index] = sub.masked_fill(probs < floor, float("-inf"))
    return logits


def draw_uniforms(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One float64 in [0, 1) per row on the CPU: from the row's generator, else from the global one."""
    u = torch.rand(len(generators), dtype=torch.float64)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand((), dtype=torch.float64, generator=g, device=g.device).item()
    return u


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[n, V] probabilities (need not sum to 1) and [n] uniforms in [0, 1) -> [n] token ids.

    Picks the first token whose cumulative probability exceeds u * total, which is never a token of
    probability zero (its cumulative value equals its predecessor's).
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    target = u.to(device=cdf.device, dtype=cdf.dtype).unsqueeze(1) * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _choose(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """[B] long: argmax for greedy rows, a filtered random draw for the others."""
    n = len(rows)
    sampled = [i for i, r in enumerate(rows) if not is_greedy(r.params)]
    tokens = logits.argmax(dim=-1) if len(sampled) < n else torch.empty(n, dtype=torch.long, device=logits.device)
    if sampled:
        index = _select(sampled, n, logits.device)
        tokens[index] = _sample(logits[index], [rows[i] for i in sampled])
    return tokens


def _sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    params = [r.params for r in rows]
    scaled = _finite(logits / _column([p.temperature for p in params], logits))
    apply_top_k(scaled, [p.top_k for p in params])
    apply_top_p(scaled, [p.top_p for p in params])
    apply_min_p(scaled, [p.min_p for p in params])
    probs = scaled.softmax(dim=-1)
    # NaN or nothing left (a row of -inf): take its largest logit instead (a select, not a host-side test)
    broken = ~(probs.sum(dim=-1, keepdim=True) > 0)
    top = torch.nn.functional.one_hot(scaled.argmax(dim=-1), probs.shape[1]).to(probs.dtype)
    probs = torch.where(broken, top, probs)
    return inverse_cdf_sample(probs, draw_uniforms([r.generator for r in rows]))


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """In place: NaN -> -inf and +inf -> the largest finite value, which extreme but valid parameters produce
    (a repetition_penalty that rounds to 0 divides by it, a temperature just above greedy overflows)."""
    return torch.nan_to_num_(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def _logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, token_ids: list[int], rows: Sequence[SamplingRow]
) -> list[TokenLogprob | None]:
    """The sampled token's logprob and the top k under log_softmax of the raw logits."""
    picked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not picked:
        return out
    index = _select(picked, len(rows), raw.device)
    logp = raw[index].log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
    ks = [min(rows[i].params.logprobs or 0, logp.shape[1]) for i in picked]
    top_vals, top_ids = logp.topk(max(ks), dim=-1)
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(picked):
        top = list(zip(top_ids[j][: ks[j]], top_vals[j][: ks[j]], strict=True))
        out[i] = TokenLogprob(token_id=token_ids[i], logprob=chosen[j], top=top)
    return out
