"""Sampler tests against oracles: HF logits processors, the OpenAI penalty formula, log_softmax."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rtllm.runtime.sampler import (
    Sampler,
    SamplingRow,
    compute_logprobs,
    make_generator,
    process_logits,
)
from rtllm.sampling_params import SamplingParams

EOS = frozenset({2})


def row(prompt: list[int] | None = None, output: list[int] | None = None, eos=EOS, **kw) -> SamplingRow:
    params = SamplingParams(max_tokens=None, **kw)
    return SamplingRow(params, make_generator(params.seed), prompt or [0, 1], output or [], eos)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    random.seed(1234)


def hf_chain(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """The HF processor chain for one row ([1, V] float32), in the sampler's order."""
    p = r.params
    ids = torch.tensor([r.prompt_token_ids + r.output_token_ids])
    x = logits.clone()
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    if p.greedy:
        return x
    procs = [TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else []
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    for proc in procs:
        x = proc(ids, x)
    return x


def random_rows(n: int, vocab: int) -> list[SamplingRow]:
    rng = random.Random(7)
    rows = []
    for _ in range(n):
        rows.append(
            row(
                prompt=[rng.randrange(vocab) for _ in range(rng.randrange(1, 30))],
                output=[rng.randrange(vocab) for _ in range(rng.randrange(0, 20))],
                temperature=rng.choice([0.0, 0.5, 1.0, 1.7]),
                top_k=rng.choice([0, 1, 5, 40]),
                top_p=rng.choice([1.0, 0.3, 0.8, 0.95]),
                min_p=rng.choice([0.0, 0.05, 0.3]),
                repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
            )
        )
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_process_logits_matches_hf_chain(dtype):
    vocab = 300
    rows = random_rows(48, vocab)
    logits = (torch.randn(len(rows), vocab) * 3).to(dtype)
    before = logits.clone()
    ours = process_logits(logits, rows)
    assert torch.equal(logits, before), "input logits must not be modified"
    assert ours.dtype == torch.float32
    for i, r in enumerate(rows):
        ref = hf_chain(logits[i : i + 1].float(), r)[0]
        assert torch.equal(torch.isfinite(ours[i]), torch.isfinite(ref)), f"row {i}: surviving set differs"
        torch.testing.assert_close(ours[i].softmax(-1), ref.softmax(-1), atol=1e-6, rtol=1e-5)


def test_top_p_ties_and_min_tokens_to_keep_follow_hf():
    # Four tied tokens of 0.25: top_p 0.5 keeps exactly two (HF splits a tie by sort order).
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, -1.0]])
    for top_p in (0.01, 0.5, 0.6, 0.99):
        rows = [row(top_p=top_p) for _ in range(3)]
        ours = process_logits(logits, rows)
        ref = TopPLogitsWarper(top_p)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
        assert (torch.isfinite(ours).sum(-1) >= 1).all()
    ours = process_logits(logits, [row(top_p=0.5) for _ in range(3)])
    assert torch.isfinite(ours).sum(-1).tolist() == [2, 1, 2]  # 0.458 alone is < 0.5


def test_presence_frequency_penalties_openai_formula():
    vocab = 50
    rng = random.Random(3)
    rows = [
        row(
            prompt=[rng.randrange(vocab) for _ in range(10)],
            output=[rng.randrange(10) for _ in range(rng.randrange(0, 25))],
            temperature=0.0,
            presence_penalty=rng.choice([0.0, 0.5, -1.0, 2.0]),
            frequency_penalty=rng.choice([0.0, 0.3, -0.7, 1.5]),
        )
        for _ in range(12)
    ]
    logits = torch.randn(len(rows), vocab)
    ours = process_logits(logits, rows)
    for i, r in enumerate(rows):
        ref = logits[i].tolist()
        for t in set(r.output_token_ids):  # output only: prompt tokens are not penalized
            c = r.output_token_ids.count(t)
            ref[t] -= r.params.presence_penalty * (c > 0) + r.params.frequency_penalty * c
        torch.testing.assert_close(ours[i], torch.tensor(ref), atol=1e-5, rtol=1e-5)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    vocab = 10
    logits = torch.zeros(5, vocab)
    logits[:, 2] = 100.0  # EOS
    logits[:, 7] = 50.0  # stop id
    rows = [
        row(output=[4], min_tokens=3, stop_token_ids=[7], temperature=0.0),  # below: both masked
        row(output=[4, 4, 4], min_tokens=3, stop_token_ids=[7], temperature=0.0),  # reached
        row(output=[], min_tokens=2, stop_token_ids=[7], ignore_eos=True, temperature=0.0),
        row(output=[], ignore_eos=True, temperature=0.0),  # ignore_eos alone masks nothing
        row(output=[], min_tokens=2, stop_token_ids=[7], temperature=1.0),  # sampled row too
    ]
    x = process_logits(logits, rows)
    assert torch.isinf(x[0, [2, 7]]).all()
    assert torch.isfinite(x[1]).all()
    assert torch.isinf(x[2, 7]) and x[2, 2] == 100.0  # ignore_eos: EOS allowed, stop id masked
    assert torch.isfinite(x[3]).all()
    out = Sampler().sample(logits, rows)
    assert out.token_ids.tolist()[:4] == [0, 2, 2, 2]
    assert out.token_ids[4] not in (2, 7)


def test_greedy_is_argmax_and_fast_path():
    logits = torch.randn(16, 1000, dtype=torch.bfloat16)
    out = Sampler().sample(logits, [row(temperature=0.0) for _ in range(16)])
    assert out.token_ids.dtype == torch.int64 and out.token_ids.device.type == "cpu"
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None


def test_mixed_greedy_and_sampled_rows():
    vocab = 64
    logits = torch.randn(8, vocab) * 4
    rows = [row(temperature=0.0) if i % 2 == 0 else row(temperature=1.0, top_k=1) for i in range(8)]
    rows[0] = row(temperature=0.0, repetition_penalty=1.5, prompt=[int(logits[0].argmax())])
    out = Sampler().sample(logits, rows)
    expected = process_logits(logits, rows).argmax(-1)  # top_k=1 is also deterministic
    assert torch.equal(out.token_ids, expected)
    assert torch.equal(out.token_ids[2::2], logits[2::2].argmax(-1))
    # A sampled row's draw stays within its surviving set.
    rows = [row(temperature=0.0), row(temperature=1.3, top_k=3, seed=5), row(temperature=0.7, top_p=0.5)]
    for _ in range(20):
        logits = torch.randn(3, vocab)
        x = process_logits(logits, rows)
        out = Sampler().sample(logits, rows)
        assert out.token_ids[0] == logits[0].argmax()
        assert torch.isfinite(x[[1, 2], out.token_ids[1:]]).all()


def draw_seq(seed: int, logits_seq: list[torch.Tensor], position: int, others: int) -> list[int]:
    gen_rows = [row(temperature=1.0, seed=seed)]
    tokens = []
    for logits in logits_seq:
        noise_rows = [row(temperature=0.9) for _ in range(others)]
        rows = noise_rows[:position] + gen_rows + noise_rows[position:]
        batch = torch.randn(len(rows), logits.shape[0])
        batch[position] = logits
        tokens.append(int(Sampler().sample(batch, rows).token_ids[position]))
    return tokens


def test_seed_reproducible_across_batch_composition():
    vocab = 1000
    logits_seq = [torch.zeros(vocab) for _ in range(8)]  # flat: many equally likely tokens
    a = draw_seq(42, logits_seq, position=0, others=0)
    b = draw_seq(42, logits_seq, position=3, others=6)
    c = draw_seq(42, logits_seq, position=1, others=2)
    assert a == b == c
    assert draw_seq(43, logits_seq, position=0, others=0) != a
    assert len(set(a)) > 1  # the generator advances between steps


def test_sampling_frequencies_match_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03, 0.0])
    logits = probs.log().expand(20000, -1)
    n = logits.shape[0]

    def freqs(**kw) -> torch.Tensor:
        out = Sampler().sample(logits, [row(**kw) for _ in range(n)])
        return torch.bincount(out.token_ids, minlength=probs.numel()).float() / n

    assert (freqs(temperature=1.0) - probs).abs().max() < 0.02
    sharp = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
    assert (freqs(temperature=0.5) - sharp).abs().max() < 0.02
    top_p = torch.tensor([2 / 3, 1 / 3, 0, 0, 0, 0])  # 0.5 + 0.25 >= 0.7
    assert (freqs(temperature=1.0, top_p=0.7) - top_p).abs().max() < 0.02
    top_k = probs.clone()
    top_k[3:] = 0
    assert (freqs(temperature=1.0, top_k=3) - top_k / top_k.sum()).abs().max() < 0.02
    min_p = probs.clone()
    min_p[min_p < 0.1 * 0.5] = 0  # keeps 0.07, drops 0.03
    assert (freqs(temperature=1.0, min_p=0.1) - min_p / min_p.sum()).abs().max() < 0.02


def test_logprobs_from_raw_logits():
    vocab = 100
    logits = torch.randn(4, vocab) * 2
    rows = [
        row(temperature=0.8, logprobs=5, repetition_penalty=1.4, prompt=list(range(50))),
        row(temperature=0.0, logprobs=0),
        row(temperature=1.0),
        row(temperature=0.0, logprobs=2, presence_penalty=1.0, output=[3, 4]),
    ]
    out = Sampler().sample(logits, rows)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    assert out.top_logprobs is not None and out.top_logprobs[2] is None and out.top_logprobs[1] == []
    for i, k in ((0, 5), (3, 2)):
        top = out.top_logprobs[i]
        vals, ids = ref[i].topk(k)
        assert [t for t, _ in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), vals)

    chosen, tops = compute_logprobs(logits.bfloat16(), 3, torch.tensor([1, 2, 3, 4]))
    ref = torch.log_softmax(logits.bfloat16().float(), -1)
    torch.testing.assert_close(chosen, ref[torch.arange(4), torch.tensor([1, 2, 3, 4])])
    assert [[t for t, _ in r] for r in tops] == ref.topk(3).indices.tolist()
