"""The batched sampler against per-row float64 references written here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mixquant_serve.layers.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    inverse_cdf_sample,
)
from mixquant_serve.sampling_params import SamplingParams


@dataclasses.dataclass
class Row:
    params: SamplingParams
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    generator: torch.Generator | None = None
    stop_token_set: frozenset[int] = frozenset()


def seeded(params: SamplingParams, **kw: object) -> Row:
    """A row whose generator is made from params.seed, the way the engine does it."""
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    return Row(params, generator=gen, **kw)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- per-row float64 references --------------------------------------------------------------


def softmax64(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    return e / e.sum()


def ref_top_k(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= len(x):
        return np.ones(len(x), dtype=bool)
    return x >= np.sort(x)[::-1][k - 1]


def ref_top_p(x: np.ndarray, p: float) -> np.ndarray:
    probs = softmax64(x)
    keep = np.zeros(len(x), dtype=bool)
    total = 0.0
    for tok in np.argsort(-probs, kind="stable"):
        keep[tok] = True
        total += probs[tok]
        if total >= p:
            break
    return keep & np.isfinite(x)


def ref_min_p(x: np.ndarray, p: float) -> np.ndarray:
    probs = softmax64(x)
    return probs >= p * probs.max()


def ref_filtered_probs(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a sampled row draws from: temperature, then top-k, top-p, min-p, renormalized."""
    z = np.asarray(x, dtype=np.float64) / params.temperature
    z = np.where(ref_top_k(z, params.top_k), z, -np.inf)
    z = np.where(ref_top_p(z, params.top_p), z, -np.inf)
    if params.min_p > 0:
        z = np.where(ref_min_p(z, params.min_p), z, -np.inf)
    return softmax64(z)


def ref_penalized(x: np.ndarray, row: Row) -> np.ndarray:
    p, out = row.params, np.asarray(x, dtype=np.float64).copy()
    seen = set(row.prompt_ids) | set(row.output_ids)
    for tok in range(len(out)):
        if tok in seen:
            out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
        count = row.output_ids.count(tok)
        out[tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


# ---- greedy and logprobs ---------------------------------------------------------------------


def test_greedy_equals_argmax() -> None:
    logits = random_logits(9, 300, seed=1)
    rows = [Row(SamplingParams(temperature=0.0)) for _ in range(9)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()
    # the general path (any row wanting logprobs) gives the same greedy tokens
    rows[4] = Row(SamplingParams(temperature=0.0, logprobs=2))
    out = Sampler()(logits, rows)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert all(isinstance(t, int) for t in out.token_ids)
    assert out.logprobs[4] is not None and all(lp is None for i, lp in enumerate(out.logprobs) if i != 4)


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = random_logits(6, 500, seed=2)
    ks = [0, 1, 5, 20, None, 3]
    rows = [
        Row(SamplingParams(temperature=0.0, logprobs=ks[0])),
        Row(SamplingParams(temperature=0.7, top_p=0.9, logprobs=ks[1])),
        seeded(SamplingParams(temperature=1.3, top_k=7, seed=5, logprobs=ks[2])),
        # penalties and temperature change the choice, never the reported logprobs
        Row(SamplingParams(temperature=0.0, repetition_penalty=1.8, logprobs=ks[3]), [1, 2, 3], [4, 5]),
        Row(SamplingParams(temperature=0.0)),
        Row(SamplingParams(temperature=0.5, frequency_penalty=1.0, logprobs=ks[5]), output_ids=[9, 9]),
    ]
    out = Sampler()(logits, rows)
    ref = torch.log_softmax(logits.double(), dim=-1).numpy()
    for i, k in enumerate(ks):
        lp = out.logprobs[i]
        if k is None:
            assert lp is None
            continue
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, out.token_ids[i]], abs=1e-5)
        expected_ids = np.argsort(-ref[i], kind="stable")[:k].tolist()
        assert [t for t, _ in lp.top] == expected_ids
        assert [v for _, v in lp.top] == pytest.approx(ref[i, expected_ids].tolist(), abs=1e-5)


# ---- filters as masks ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_mask_matches_reference(seed: int) -> None:
    logits = random_logits(12, 257, seed=seed)
    ks = [-1, 0, 1, 2, 5, 17, 100, 256, 257, 400, 3, 64]
    masked = apply_top_k(logits.clone(), ks)
    for i, k in enumerate(ks):
        np.testing.assert_array_equal(torch.isfinite(masked[i]).numpy(), ref_top_k(logits[i].numpy(), k))
        kept = torch.isfinite(masked[i])
        assert torch.equal(masked[i][kept], logits[i][kept])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_p_mask_matches_reference(seed: int) -> None:
    logits = random_logits(10, 300, seed=seed, scale=2.0 + seed)
    ps = [1.0, 0.9, 0.5, 0.1, 1e-6, 0.99, 0.75, 0.3, 0.95, 0.6]
    masked = apply_top_p(logits.clone(), ps)
    for i, p in enumerate(ps):
        expected = ref_top_p(logits[i].numpy(), p)
        np.testing.assert_array_equal(torch.isfinite(masked[i]).numpy(), expected)
    assert torch.isfinite(masked[4]).sum() == 1  # a tiny top_p keeps only the top token
    assert torch.isfinite(masked[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_top_p_that_rounds_to_zero_keeps_the_top_token(dtype: torch.dtype) -> None:
    # 4e-217 is 0 in float32: "mass above >= top_p" then held for the top token too (found by fuzzing the API)
    logits = random_logits(3, 100, seed=5).to(dtype)
    masked = apply_top_p(logits.clone(), [4e-217, 1e-300, 1e-45])
    assert (torch.isfinite(masked).sum(dim=-1) == 1).all()
    assert torch.equal(masked.float().argmax(dim=-1), logits.float().argmax(dim=-1))


def test_extreme_but_valid_parameters_sample_a_real_token() -> None:
    # a repetition_penalty that is 0 in float32 divides logits by zero (inf, NaN); found by fuzzing the API
    vocab = 50
    logits = random_logits(4, vocab, seed=3)
    logits[:, 7] = 0.0  # 0 / 0 = NaN under the penalty
    params = [SamplingParams(temperature=1.0, repetition_penalty=2e-55, seed=0, max_tokens=4),
              SamplingParams(temperature=1.0, repetition_penalty=2e-55, seed=1, max_tokens=4),
              SamplingParams(temperature=1.0001e-5, seed=9, max_tokens=4),
              SamplingParams(temperature=2.0, top_p=1e-300, min_p=1.0, seed=1, max_tokens=4, logprobs=2)]
    rows = [seeded(p, prompt_ids=list(range(vocab))) for p in params]
    out = Sampler()(logits, rows)
    assert all(0 <= t < vocab for t in out.token_ids)
    assert out.token_ids[3] == int(logits[3].argmax())


def test_top_p_on_already_masked_rows() -> None:
    logits = random_logits(4, 200, seed=7)
    ks, ps = [5, 50, 1, 199], [0.8, 0.7, 0.5, 0.9]
    masked = apply_top_p(apply_top_k(logits.clone(), ks), ps)
    for i in range(4):
        z = np.where(ref_top_k(logits[i].numpy(), ks[i]), logits[i].numpy().astype(np.float64), -np.inf)
        np.testing.assert_array_equal(torch.isfinite(masked[i]).numpy(), ref_top_p(z, ps[i]))


@pytest.mark.parametrize("seed", [0, 1])
def test_min_p_mask_matches_reference(seed: int) -> None:
    logits = random_logits(8, 300, seed=seed)
    ps = [0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0]
    masked = apply_min_p(logits.clone(), ps)
    for i, p in enumerate(ps):
        expected = ref_min_p(logits[i].numpy(), p) if p > 0 else np.ones(300, dtype=bool)
        np.testing.assert_array_equal(torch.isfinite(masked[i]).numpy(), expected)
    assert 1 < torch.isfinite(masked[2]).sum() < 300  # the test data actually exercises the filter


# ---- drawing ---------------------------------------------------------------------------------


def test_inverse_cdf_never_picks_zero_probability() -> None:
    probs = torch.tensor([[0.25, 0.0, 0.5, 0.25, 0.0]] * 7)  # exact in binary, so the edges are exact
    u = torch.tensor([0.0, 0.1, 0.25, 0.74, 0.76, 0.999999, np.nextafter(1.0, 0.0)], dtype=torch.float64)
    assert inverse_cdf_sample(probs, u).tolist() == [0, 0, 2, 2, 3, 3, 3]
    unnormalized = torch.tensor([[0.0, 4.0, 0.0, 4.0, 0.0]] * 3)
    u = torch.tensor([0.0, 0.49, 0.51], dtype=torch.float64)
    assert inverse_cdf_sample(unnormalized, u).tolist() == [1, 1, 3]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.2, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=1.7, top_k=6, top_p=0.9, min_p=0.1),
    ],
)
def test_sampling_frequencies_follow_filtered_distribution(params: SamplingParams) -> None:
    torch.manual_seed(1234)
    base = torch.tensor([2.0, 1.6, 1.0, 0.4, 0.0, -0.5, -1.0, -2.0])
    draws = 20_000
    tokens = Sampler()(base.expand(draws, -1), [Row(params)] * draws).token_ids
    freq = np.bincount(tokens, minlength=8) / draws
    expected = ref_filtered_probs(base.numpy(), params)
    # each frequency has std <= sqrt(0.25 / 20000) = 0.0035; 0.015 is > 4 std and far below every
    # wrong answer here (ignoring temperature or one filter moves some probability by >= 0.04).
    assert np.abs(freq - expected).max() < 0.015
    assert freq[expected == 0].sum() == 0


def test_seeded_rows_reproduce_and_differ_across_seeds() -> None:
    steps = [random_logits(1, 50, seed=100 + s, scale=0.5).expand(3, -1) for s in range(12)]

    def run(seeds: list[int], global_seed: int) -> list[list[int]]:
        torch.manual_seed(global_seed)  # seeded rows must not depend on the global RNG
        rows = [seeded(SamplingParams(temperature=1.0, top_p=0.95, seed=s)) for s in seeds]
        return [Sampler()(logits, rows).token_ids for logits in steps]

    first = run([7, 7, 8], global_seed=0)
    assert first == run([7, 7, 8], global_seed=99)
    by_row = list(zip(*first, strict=True))
    assert by_row[0] == by_row[1]
    assert by_row[0] != by_row[2]
    assert len(set(by_row[0])) > 3  # the draws are actually random


def test_unseeded_rows_follow_global_rng() -> None:
    logits = random_logits(4, 1000, seed=3, scale=0.1)
    rows = [Row(SamplingParams(temperature=1.0))] * 4
    torch.manual_seed(5)
    a = Sampler()(logits, rows).token_ids
    torch.manual_seed(5)
    assert Sampler()(logits, rows).token_ids == a
    torch.manual_seed(6)
    assert Sampler()(logits, rows).token_ids != a


# ---- penalties and min_tokens ----------------------------------------------------------------


def test_penalties_match_reference_formula() -> None:
    logits = random_logits(5, 40, seed=11)
    rows = [
        Row(SamplingParams(repetition_penalty=1.5), [1, 2, 3, 3], [4, 1]),
        Row(SamplingParams(frequency_penalty=0.7), [5, 6], [6, 6, 7, 9, 9, 9]),
        Row(SamplingParams(presence_penalty=-0.8), [1], [2, 2, 3]),
        Row(SamplingParams(), [1, 2], [3, 4]),  # no penalties: untouched
        Row(
            SamplingParams(repetition_penalty=0.6, frequency_penalty=-1.1, presence_penalty=1.9),
            [0, 10, 20, 30],
            [10, 11, 11, 39, 0],
        ),
    ]
    out = apply_penalties(logits.clone(), rows)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(out[i].double().numpy(), ref_penalized(logits[i].numpy(), row), atol=1e-5)
    assert not torch.equal(out[0], logits[0]) and not torch.equal(out[4], logits[4])
    assert torch.equal(out[3], logits[3])


def test_greedy_with_penalties_picks_penalized_argmax() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0, -1.0], [3.0, 2.9, 2.8, 0.0], [1.0, -0.5, -0.6, -3.0]])
    rows = [
        Row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt_ids=[0]),  # 5/2 < 4
        Row(SamplingParams(temperature=0.0, frequency_penalty=0.15), output_ids=[0, 0, 1, 1]),  # 2.8 wins
        Row(SamplingParams(temperature=0.0, repetition_penalty=1.5), output_ids=[1]),  # -0.75 < -0.6
    ]
    rows[2] = dataclasses.replace(rows[2], prompt_ids=[0])  # 1/1.5 still the best
    out = Sampler()(logits, rows).token_ids
    assert out == [int(np.argmax(ref_penalized(logits[i].numpy(), r))) for i, r in enumerate(rows)]
    assert out == [1, 2, 0]


def test_min_tokens_masks_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 2.0]]).expand(4, -1)
    stops = frozenset({2, 3})
    params = SamplingParams(temperature=0.0, min_tokens=3)
    rows = [
        Row(params, output_ids=[], stop_token_set=stops),
        Row(params, output_ids=[1, 1], stop_token_set=stops),
        Row(params, output_ids=[1, 1, 1], stop_token_set=stops),  # reached min_tokens
        Row(params, output_ids=[], stop_token_set=frozenset({2, 99})),  # out-of-vocab ids are ignored
    ]
    assert Sampler()(logits, rows).token_ids == [4, 4, 2, 3]
    # a sampled row never draws a masked stop token
    torch.manual_seed(0)
    hot = torch.tensor([[0.0, 0.0, 6.0, 6.0, 0.0]]).expand(2000, -1)
    drawn = Sampler()(hot, [Row(SamplingParams(min_tokens=1), stop_token_set=stops)] * 2000).token_ids
    assert not stops & set(drawn)


# ---- mixed batch -----------------------------------------------------------------------------


def mixed_rows() -> list[Row]:
    """Deterministic rows (greedy or seeded) of every kind; fresh generators on every call."""
    stops = frozenset({0, 1})
    return [
        Row(SamplingParams(temperature=0.0)),
        Row(SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=3), [5, 6, 7], [8, 5]),
        seeded(SamplingParams(temperature=0.8, top_p=0.9, seed=1)),
        seeded(
            SamplingParams(
                temperature=1.1,
                top_k=20,
                frequency_penalty=0.5,
                presence_penalty=0.3,
                seed=2,
                logprobs=5,
                min_tokens=4,
            ),
            prompt_ids=[1, 2],
            output_ids=[3, 3],
            stop_token_set=stops,
        ),
        Row(SamplingParams(temperature=0.0, min_tokens=2), output_ids=[9], stop_token_set=stops),
        seeded(SamplingParams(temperature=0.6, min_p=0.05, seed=3, logprobs=0)),
        seeded(SamplingParams(temperature=1.0, seed=4)),
    ]


def test_mixed_batch_equals_rows_alone() -> None:
    logits = random_logits(7, 64, seed=21, scale=1.0)
    logits[:, :2] += 4.0  # make the stop tokens likely, so min_tokens matters
    before = logits.clone()
    batch = Sampler()(logits, mixed_rows())
    assert torch.equal(logits, before)  # penalties and masks work on a copy
    for i, row in enumerate(mixed_rows()):
        alone = Sampler()(logits[i : i + 1], [row])
        assert alone.token_ids == [batch.token_ids[i]]
        a, b = alone.logprobs[0], batch.logprobs[i]
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-6)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert batch.token_ids[3] not in (0, 1) and batch.token_ids[4] not in (0, 1)


def test_empty_batch_and_shape_check() -> None:
    assert Sampler()(torch.zeros(0, 10), []) == ([], [])
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 10), [Row(SamplingParams())])


# ---- devices ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_seeded_tokens_same_on_cuda_and_cpu() -> None:
    logits = random_logits(len(mixed_rows()), 32_000, seed=5, scale=2.0)
    cpu = Sampler()(logits, mixed_rows())
    gpu = Sampler()(logits.cuda(), mixed_rows())
    assert gpu.token_ids == cpu.token_ids
    for a, b in zip(cpu.logprobs, gpu.logprobs, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
