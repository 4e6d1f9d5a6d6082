"""The PyExecutor step loop on a tiny random Llama: inflight batching, chunked prefill, prefix reuse,
KV exhaustion with preemption, n > 1, prompt logprobs. transformers' greedy output is the oracle."""

import pytest
import torch

from rtllm.runtime.py_executor import NewRequest
from rtllm.sampling_params import SamplingParams
from tests.tiny import hf_greedy, make_checkpoint, make_engine, ramp_prompts, run_engine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = make_checkpoint(str(path), "llama")
    return str(path), hf


def greedy(n=16):
    return SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0)  # EOS masked, as HF min_new_tokens


def test_inflight_batching_matches_alone(ckpt):
    path, hf = ckpt
    prompts = ramp_prompts(17, seed=11, lo=2, hi=70)
    engine = make_engine(path, max_batch_size=8, max_num_tokens=64)
    arrivals = [0, 0, 1, 2, 3, 3, 5, 8, 9, 13, 14, 20, 21, 22, 30, 31, 40]
    together = run_engine(engine, prompts, greedy(), arrivals)
    for p, t in zip(prompts, together):
        assert t == hf_greedy(hf, p, 16)
    assert engine.kv.stats().used_blocks == 0


def test_chunked_prefill_equals_unchunked(ckpt):
    path, _ = ckpt
    prompts = ramp_prompts(4, seed=12, lo=20, hi=60)
    chunked = make_engine(path, max_batch_size=4, max_num_tokens=7)
    whole = make_engine(path, max_batch_size=4, max_num_tokens=512, chunked=False)
    assert run_engine(chunked, prompts, greedy()) == run_engine(whole, prompts, greedy())


def test_prefix_reuse_computes_only_the_suffix(ckpt):
    path, hf = ckpt
    g = torch.Generator().manual_seed(13)
    prefix = torch.randint(0, 256, (200,), generator=g).tolist()
    first, second = prefix + [1, 2, 3], prefix + [7, 8, 9, 10]
    engine = make_engine(path, tokens_per_block=8)
    out1 = run_engine(engine, [first], greedy())[0]
    computed_before = engine.scheduler.prefill_tokens_computed
    hits_before = engine.kv.stats().hit_tokens
    out2 = run_engine(engine, [second], greedy())[0]
    cached = (200 // 8) * 8
    assert engine.kv.stats().hit_tokens - hits_before == cached
    assert engine.scheduler.prefill_tokens_computed - computed_before == len(second) - cached
    assert out1 == hf_greedy(hf, first, 16) and out2 == hf_greedy(hf, second, 16)


def test_kv_exhaustion_preempts_and_finishes_everything(ckpt):
    path, hf = ckpt
    prompts = ramp_prompts(32, seed=14, lo=10, hi=40)
    # 160 tokens of KV for 32 requests of up to ~56 tokens each: forces preemption and waiting
    engine = make_engine(path, max_batch_size=16, max_num_tokens=128, kv_tokens=160, tokens_per_block=8)
    outs = run_engine(engine, prompts, greedy())
    assert engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(hf, p, 16)
    assert engine.kv.stats().used_blocks == 0


def test_n_samples_share_prompt_blocks(ckpt):
    path, _ = ckpt
    engine = make_engine(path, tokens_per_block=8)
    prompt = ramp_prompts(1, seed=15, lo=60, hi=61)[0]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3)
    for i in range(3):
        engine.enqueue(NewRequest(f"r:{i}", prompt, params, seed=5 + i, wait_for="r:0" if i else None))
    outs: dict[str, list[int]] = {}
    done = 0
    while done < 3:
        engine._drain_inbox(block=False)
        for u in engine.step():
            outs.setdefault(u.request_id, []).extend(u.new_token_ids)
            done += u.finished
    # siblings waited for the first sample's prompt and reused its full blocks
    assert engine.scheduler.prefill_tokens_computed == 60 + 2 * (60 - (59 // 8) * 8)
    assert len({tuple(v) for v in outs.values()}) == 3  # different seeds, different samples


def test_prompt_logprobs_match_transformers(ckpt):
    path, hf = ckpt
    prompt = ramp_prompts(1, seed=16, lo=30, hi=31)[0]
    engine = make_engine(path, max_num_tokens=16, max_batch_size=4)  # chunked: logprobs span chunks
    engine.enqueue(NewRequest("a", prompt, SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0)))
    got = []
    while True:
        engine._drain_inbox(block=False)
        ups = engine.step()
        for u in ups:
            got.extend(u.prompt_logprobs or [])
        if any(u.finished for u in ups):
            break
    ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], -1)
    assert got[0] is None and len(got) == len(prompt)
    for i, (lp, top) in enumerate(got[1:]):
        assert abs(lp - ref[i, prompt[i + 1]].item()) < 1e-4
        assert [t for t, _ in top] == ref[i].topk(2).indices.tolist()
