"""The PyExecutor's pipeline micro-batch loop in one process: a runner whose ``launch`` runs the model at
once and whose ``finish`` hands the logits back later stands in for the stages (every rank runs
micro-batches in launch order, so the model sees the same inputs in the same order). Tokens must be
those of the one-step-at-a-time loop, with and without overlap scheduling, under arrivals, EOS / stop
tokens mid-flight, max_tokens=1, preemption, aborts, penalties and logprobs; no request is ever in two
micro-batches in flight and every KV block comes back."""

from dataclasses import dataclass

import pytest

from rtllm.runtime.model_runner import ModelOutput
from rtllm.sampling_params import SamplingParams
from tests.parallel.pipeline_harness import run_script
from tests.tiny import make_checkpoint, make_engine, ramp_prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("micro")
    make_checkpoint(str(path), "llama")
    return str(path)


@dataclass
class _Handle:
    out: ModelOutput

    @property
    def sample_rows(self) -> list[int]:
        return self.out.sample_rows


class LocalStages:
    """launch(): the whole model now (as stage 0 would start it); finish(): its output."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.launched = self.finished = 0

    def launch(self, batch, prev=None) -> _Handle:
        self.launched += 1
        return _Handle(self.runner.execute(batch, prev))

    def finish(self, handle: _Handle) -> ModelOutput:
        self.finished += 1
        return handle.out

    def execute(self, batch, prev=None) -> ModelOutput:  # one micro-batch at a time: today's step
        return self.runner.execute(batch, prev)


def pipelined(ckpt, micro: int = 2, overlap: bool = False, **kw):
    engine = make_engine(ckpt, overlap=overlap, **kw)
    engine.runner = LocalStages(engine.runner)
    engine.num_micro_batches = micro
    return engine


def compare(ckpt, prompts, params, arrivals=None, aborts=None, micro=2, **kw):
    ref = run_script(make_engine(ckpt, **kw), prompts, params, arrivals, aborts)
    outs = []
    for overlap in (False, True):
        engine = pipelined(ckpt, micro, overlap, **kw)
        got = run_script(engine, prompts, params, arrivals, aborts)
        assert engine.runner.launched == engine.runner.finished
        assert got["used_blocks"] == 0
        outs.append(got)
    return ref, outs


def test_more_requests_than_one_micro_batch(ckpt):
    prompts = ramp_prompts(12, seed=41, lo=2, hi=50)
    params = [SamplingParams(max_tokens=10 + i, temperature=0 if i % 2 else 0.9, seed=i, min_tokens=i % 3)
              for i in range(12)]
    ref, outs = compare(ckpt, prompts, params, arrivals=[0, 0, 1, 2, 2, 5, 8, 9, 9, 12, 20, 21],
                        max_batch_size=8, max_num_tokens=40)
    for got in outs:
        assert got["tokens"] == ref["tokens"] and got["reasons"] == ref["reasons"]
        assert got["max_micro_batches"] == 2


def test_three_micro_batches_and_one(ckpt):
    prompts = ramp_prompts(9, seed=42, lo=2, hi=40)
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    for micro in (3, 1):
        ref, outs = compare(ckpt, prompts, params, arrivals=[0, 0, 0, 1, 1, 3, 4, 4, 6], micro=micro)
        for got in outs:
            assert got["tokens"] == ref["tokens"]
            assert got["max_micro_batches"] == (micro if micro > 1 else 0)  # 0: the one-step loop ran


def test_stop_tokens_eos_and_max_tokens_1(ckpt):
    prompts = ramp_prompts(8, seed=43, lo=3, hi=30)
    base = run_script(make_engine(ckpt), prompts, SamplingParams(max_tokens=16, min_tokens=16, temperature=0))
    params = [SamplingParams(max_tokens=1, temperature=0) if i % 3 == 0 else
              SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[o[4]]) for i, o in enumerate(base["tokens"])]
    ref, outs = compare(ckpt, prompts, params, arrivals=[0, 0, 1, 1, 2, 3, 3, 4])
    for got in outs:
        assert got["tokens"] == ref["tokens"] and got["reasons"] == ref["reasons"]
    assert [len(t) for t in ref["tokens"][::3]] == [1, 1, 1]
    assert all(len(t) < 16 for i, t in enumerate(ref["tokens"]) if i % 3)


def test_preemption_when_blocks_run_out(ckpt):
    prompts = ramp_prompts(16, seed=44, lo=10, hi=40)
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
    ref, outs = compare(ckpt, prompts, params, max_batch_size=8, max_num_tokens=64, kv_tokens=160)
    assert ref["preemptions"] > 0
    for got in outs:
        assert got["tokens"] == ref["tokens"]
        assert got["preemptions"] > 0


def test_abort_mid_flight(ckpt):
    """Aborted requests end with "abort" after a prefix of their tokens; the others are unchanged."""
    prompts = ramp_prompts(8, seed=45, lo=3, hi=40)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = run_script(make_engine(ckpt), prompts, params)["tokens"]
    aborts = {3: [1, 4], 6: [6], 7: [0]}
    ref, outs = compare(ckpt, prompts, params, aborts=aborts)
    assert all(got["aborted_in_flight"] > 0 for got in outs)
    for got in outs + [ref]:
        for i, toks in enumerate(got["tokens"]):
            if i in (0, 1, 4, 6):
                assert got["reasons"][i] == "abort" and toks == full[i][: len(toks)] and len(toks) < 20
            else:
                assert toks == full[i]


def test_penalties_logprobs_and_prompt_logprobs(ckpt):
    prompts = ramp_prompts(5, seed=46, lo=5, hi=30)
    params = [SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3),
              SamplingParams(max_tokens=8, temperature=0.8, seed=3, frequency_penalty=0.5),
              SamplingParams(max_tokens=8, temperature=0, logprobs=2),
              SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=1),
              SamplingParams(max_tokens=8, temperature=0)]
    ref, outs = compare(ckpt, prompts, params, arrivals=[0, 0, 1, 1, 2], max_num_tokens=24)
    for got in outs:
        assert got["tokens"] == ref["tokens"]


def test_single_rank_default_is_one_micro_batch(ckpt):
    engine = make_engine(ckpt)
    assert engine.num_micro_batches == 1 and engine.info()["num_micro_batches"] == 1
