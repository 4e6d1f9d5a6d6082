"""Overlap scheduling (step N+1 launched before step N's tokens are read back) gives exactly the
tokens of the synchronous loop: greedy and seeded sampling, inflight arrivals, EOS and stop tokens
that end a request while its next step is already launched, preemption with a token in flight."""

import pytest

from rtllm.sampling_params import SamplingParams
from tests.tiny import make_checkpoint, make_engine, ramp_prompts, run_engine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("overlap")
    make_checkpoint(str(path), "llama")
    return str(path)


def both(ckpt, prompts, params, arrivals=None, **kw):
    outs = []
    for overlap in (False, True):
        engine = make_engine(ckpt, overlap=overlap, **kw)
        assert engine.overlap is overlap
        outs.append(run_engine(engine, prompts, params, arrivals))
        while engine.has_work():  # a step launched for requests that finished meanwhile: nothing to emit
            assert engine.step() == []
        assert engine.kv.stats().used_blocks == 0
    return outs


def test_greedy_and_seeded_with_inflight_arrivals(ckpt):
    prompts = ramp_prompts(12, seed=31, lo=2, hi=50)
    params = [SamplingParams(max_tokens=12 + i, temperature=0 if i % 2 else 0.9, seed=i, min_tokens=i % 3)
              for i in range(12)]
    sync, over = both(ckpt, prompts, params, arrivals=[0, 0, 1, 2, 2, 5, 8, 9, 9, 12, 20, 21],
                      max_batch_size=6, max_num_tokens=40)
    assert sync == over


def test_stop_tokens_and_eos_end_requests_mid_flight(ckpt):
    prompts = ramp_prompts(6, seed=32, lo=3, hi=30)
    base = both(ckpt, prompts, SamplingParams(max_tokens=20, min_tokens=20, temperature=0))[0]
    # stop on a token each request produces mid-way: its next step is already launched
    params = [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[o[5]]) for o in base]
    sync, over = both(ckpt, prompts, params)
    assert sync == over
    assert all(len(o) < 20 for o in over)


def test_preemption_with_tokens_in_flight(ckpt):
    prompts = ramp_prompts(16, seed=33, lo=10, hi=40)
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
    sync, over = both(ckpt, prompts, params, max_batch_size=8, max_num_tokens=64, kv_tokens=160,
                      tokens_per_block=8)
    assert sync == over


def test_penalties_and_logprobs_fall_back_to_sync(ckpt):
    prompts = ramp_prompts(4, seed=34, lo=5, hi=20)
    params = [SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3),
              SamplingParams(max_tokens=10, temperature=0.8, seed=3, frequency_penalty=0.5),
              SamplingParams(max_tokens=10, temperature=0, logprobs=2),
              SamplingParams(max_tokens=10, temperature=0)]
    sync, over = both(ckpt, prompts, params)
    assert sync == over
