"""Token sampling: the Triton kernel (TRITON_INTERPRET=1 on CPU) picks the reference's token given
the same noise, with the same top-k / top-p cut; the reference against HF's warpers and the Sampler."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rtllm.kernels import sampling
from rtllm.kernels.sampling import filter_logits_torch, sample_tokens_torch
from rtllm.kernels.triton_sampling import sample_tokens_triton
from rtllm.runtime.sampler import Sampler, SamplingRow, make_generator
from rtllm.sampling_params import SamplingParams

INF = float("inf")


def params(rows: list[tuple]) -> tuple[torch.Tensor, ...]:
    """(temperature, top_k, top_p, min_p) per row -> four [B] tensors (top_p in float64)."""
    t, k, p, m = zip(*rows)
    return (torch.tensor(t, dtype=torch.float32), torch.tensor(k, dtype=torch.int64),
            torch.tensor(p, dtype=torch.float64), torch.tensor(m, dtype=torch.float32))


def noise(b: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.empty(b, v).exponential_(generator=torch.Generator().manual_seed(seed))


def check_kernel(logits: torch.Tensor, rows: list[tuple], seed: int = 0) -> torch.Tensor:
    """Triton == reference: the token of every row and the set top-k / top-p keep."""
    t, k, p, m = params(rows)
    q = noise(*logits.shape, seed=seed)
    tokens, cut = sample_tokens_triton(logits, t, k, p, m, q, return_cutoff=True)
    expected = sample_tokens_torch(logits, t, k, p, m, q)
    assert tokens.dtype == torch.int64 and tokens.shape == (logits.shape[0],)
    assert tokens.tolist() == expected.tolist()
    kept = filter_logits_torch(logits, t, k, p, torch.zeros_like(m))  # top-k / top-p only
    x = logits.float()
    for i, (ti, *_) in enumerate(rows):
        if ti == 0:
            continue
        ours = (x[i] / ti >= cut[i]) & ((x[i] > -INF) | (cut[i] == -INF))
        ref = kept[i] > -INF
        assert torch.equal(ours | (x[i] == -INF), ref | (x[i] == -INF)), f"row {i} {rows[i]}: kept sets differ"
    return tokens


def random_logits(b: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("vocab", [1000, 4099])
def test_ragged_rows_match_reference(vocab):
    logits = random_logits(8, vocab, seed=vocab)
    logits[2, :300] = -INF  # masked tokens (min_tokens, penalties) inside a sampled row
    rows = [
        (0.0, 40, 0.5, 0.2),  # greedy: the filters are ignored
        (1.0, 0, 1.0, 0.0),  # everything off
        (0.7, 5, 1.0, 0.0),  # top-k
        (1.3, -1, 0.9, 0.0),  # top-p (top_k -1: off)
        (1.0, 0, 1.0, 0.1),  # min-p
        (0.5, 50, 0.8, 0.05),  # all of them
        (2.0, vocab + 3, 0.95, 0.0),  # top_k >= V: off
        (1.0, 1, 1.0, 0.0),  # top-k 1: the argmax
    ]
    check_kernel(logits, rows, seed=1)


def test_many_random_rows_and_bf16_logits():
    rng = random.Random(5)
    vocab = 2000
    rows = [(rng.choice([0.0, 0.6, 1.0, 1.5]), rng.choice([0, 2, 20, 700, 1500]), rng.choice([1.0, 0.3, 0.9, 0.99]),
             rng.choice([0.0, 0.0, 0.02, 0.2])) for _ in range(8)]
    check_kernel(random_logits(8, vocab, seed=2, scale=5.0).bfloat16(), rows, seed=3)


def test_top_k_ties_survive():
    vocab = 1000
    g = torch.Generator().manual_seed(4)
    logits = torch.randint(-6, 6, (6, vocab), generator=g).float()  # long runs of equal values
    logits[:, 7] = 9.0
    logits[:, 8:12] = 8.0  # 4 tied at the 2nd..5th place
    rows = [(1.0, 1, 1.0, 0.0), (1.0, 2, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.0, 6, 1.0, 0.0),
            (1.0, 200, 1.0, 0.0)]
    check_kernel(logits, rows, seed=5)
    kept = filter_logits_torch(logits, *params(rows)) > -INF
    assert kept.sum(-1)[:4].tolist() == [1, 5, 5, 5]  # ties at the k-th value all survive
    assert kept.sum(-1)[5] >= 200


def test_top_p_boundary():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    vocab = 1000
    base = torch.full((vocab,), -30.0)  # ~0 mass elsewhere
    base[[10, 500, 3, 999, 256, 700]] = probs.log()
    cum = probs.cumsum(0).tolist()  # 0.4, 0.65, 0.8, 0.9, 0.96, 1.0
    # just below / above each partial sum: the smallest prefix with mass >= top_p
    cases = [(c - 1e-3, n + 1) for n, c in enumerate(cum[:-1])] + [(c + 1e-3, n + 2) for n, c in enumerate(cum[:-2])]
    for chunk in (cases[:5], cases[5:]):
        logits = base.expand(len(chunk), -1).clone()
        rows = [(1.0, 0, p, 0.0) for p, _ in chunk]
        check_kernel(logits, rows, seed=6)
        kept = filter_logits_torch(logits, *params(rows)) > -INF
        assert kept.sum(-1).tolist() == [n for _, n in chunk]


def test_min_p_and_race_follow_the_reference_on_every_seed():
    logits = random_logits(4, 1500, seed=7, scale=2.0)
    rows = [(1.0, 0, 1.0, 0.01), (0.8, 0, 1.0, 0.1), (1.2, 30, 0.9, 0.3), (1.0, 0, 0.95, 0.5)]
    for seed in (8, 9):
        check_kernel(logits, rows, seed=seed)


def test_reference_equals_hf_warpers():
    """The reference's filter is the HF warper chain, row by row, with ragged parameters."""
    vocab = 400
    rng = random.Random(11)
    rows = [(rng.choice([0.5, 1.0, 1.7]), rng.choice([0, 1, 5, 40]), rng.choice([1.0, 0.3, 0.8, 0.95]),
             rng.choice([0.0, 0.05, 0.3])) for _ in range(24)]
    logits = random_logits(len(rows), vocab, seed=12)
    ours = filter_logits_torch(logits, *params(rows))
    for i, (t, k, p, m) in enumerate(rows):
        x = logits[i : i + 1].clone()
        procs = [TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k else [])
        procs += ([TopPLogitsWarper(p)] if p < 1.0 else []) + ([MinPLogitsWarper(m)] if m > 0 else [])
        for proc in procs:
            x = proc(None, x)
        assert torch.equal(ours[i] > -INF, x[0] > -INF), f"row {i}"
        torch.testing.assert_close(ours[i].softmax(-1), x[0].softmax(-1), atol=1e-6, rtol=1e-5)


def sampler_rows(specs: list[dict]) -> list[SamplingRow]:
    out = []
    for kw in specs:
        p = SamplingParams(max_tokens=None, **kw)
        out.append(SamplingRow(p, make_generator(p.seed), [0], [], frozenset({2})))
    return out


def test_reference_is_what_the_sampler_draws():
    """Sampler on CPU == sample_tokens_torch given the noise the sampler draws (global RNG)."""
    specs = [dict(temperature=0.0), dict(temperature=0.9, top_k=7), dict(temperature=1.0, top_p=0.8),
             dict(temperature=1.1, min_p=0.05), dict(temperature=0.6, top_k=50, top_p=0.9, min_p=0.02)]
    logits = random_logits(len(specs), 3000, seed=13)
    torch.manual_seed(14)
    q = torch.empty(logits.shape).exponential_()
    torch.manual_seed(14)
    got = Sampler().sample(logits, sampler_rows(specs)).token_ids
    rows = [(s.get("temperature", 1.0), s.get("top_k", 0), s.get("top_p", 1.0), s.get("min_p", 0.0)) for s in specs]
    assert got.tolist() == sample_tokens_torch(logits, *params(rows), q).tolist()


def test_sampler_through_the_kernel(monkeypatch):
    """The Sampler's kernel path (what CUDA runs) gives the reference path's tokens, seeded rows
    included, and the same tokens for a seed whatever else is in the batch."""
    specs = [dict(temperature=0.0), dict(temperature=0.9, top_k=7, seed=1), dict(temperature=1.0, top_p=0.8, seed=2),
             dict(temperature=1.1, min_p=0.05, seed=3), dict(temperature=0.6, top_k=50, top_p=0.9, seed=4),
             dict(temperature=0.0, seed=5)]
    logits = random_logits(len(specs), 2500, seed=15)
    ref = Sampler().sample(logits, sampler_rows(specs)).token_ids
    monkeypatch.setattr(sampling, "triton_enabled", lambda t: True)
    monkeypatch.setattr(sampling, "TRITON_MIN_ROWS", 1)
    got = Sampler().sample(logits, sampler_rows(specs)).token_ids
    assert got.tolist() == ref.tolist()
    alone = Sampler().sample(logits[2:3], sampler_rows(specs[2:3])).token_ids
    assert alone.tolist() == ref[2:3].tolist()


def test_split_argmax_matches_torch():
    """The greedy path's split argmax: the first index of each row's maximum, as torch's argmax, with the
    maximum repeated within and across 2048-wide chunks, at the ragged last chunk, NaN (torch counts it
    as the maximum) and an all -inf row; bf16 and fp32 rows."""
    from rtllm.kernels.triton_sampling import ARGMAX_CHUNK, argmax_triton

    V = 2 * ARGMAX_CHUNK + 37
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, V, generator=g)
    x[1, [5, ARGMAX_CHUNK + 3, 2 * ARGMAX_CHUNK + 1]] = 9.0  # ties across chunks: the first wins
    x[2, [ARGMAX_CHUNK - 1, ARGMAX_CHUNK]] = 9.0  # a tie on a chunk boundary
    x[3, V - 1] = 9.0  # the last element (ragged chunk)
    x[4, 100] = float("nan")
    x[5] = float("-inf")
    x[6, 2 * ARGMAX_CHUNK + 5] = float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        assert torch.equal(argmax_triton(xd), xd.argmax(dim=-1)), dtype
