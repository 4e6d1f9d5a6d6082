"""Pipeline parallel with several micro-batches in flight, on the CPU (gloo).

Oracle: the same engine at TP=1 / PP=1 in this process (the one-step-at-a-time loop). fp32 greedy token
ids must be identical with more concurrent requests than one micro-batch holds, prompts of different
lengths arriving while others run, chunked prefill, overlap scheduling, preemption when KV blocks run
out, stop tokens, max_tokens=1 and aborts that land while a request's micro-batch is in flight. Through
LLM: stop strings, abort, shutdown with micro-batches in flight and a killed rank end without a hang.
"""

import os
import signal
import time

import pytest

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.errors import EngineDeadError
from tests.parallel.harness import ENGINE
from tests.parallel.pipeline_harness import run_script, run_split_script
from tests.tiny import make_checkpoint, make_engine, ramp_prompts

PROMPTS = ramp_prompts(12, seed=7, lo=3, hi=90)
ARRIVALS = [0, 0, 0, 1, 2, 2, 5, 9, 9, 12, 14, 20]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pipe"))
    make_checkpoint(path, "llama", num_hidden_layers=4)
    return path


@pytest.fixture(scope="module")
def reference(ckpt):
    return run_script(make_engine(ckpt, **ENGINE), PROMPTS, GREEDY, ARRIVALS)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_pp2_micro_batches_equal_tp1(ckpt, reference, overlap):
    """12 requests, at most 8 running: each micro-batch takes about half, two in flight."""
    got = run_split_script(ckpt, 1, 2, PROMPTS, GREEDY, ARRIVALS, overrides=dict(overlap=overlap), **ENGINE)
    assert got["tokens"] == reference["tokens"]
    assert got["num_micro_batches"] == 2 and got["max_micro_batches"] == 2
    assert got["used_blocks"] == 0


def test_pp2_one_micro_batch_is_the_step_loop(ckpt, reference):
    got = run_split_script(ckpt, 1, 2, PROMPTS, GREEDY, ARRIVALS, overrides=dict(num_micro_batches=1), **ENGINE)
    assert got["tokens"] == reference["tokens"]
    assert got["num_micro_batches"] == 1 and got["max_micro_batches"] == 0  # the one-step loop ran


def test_tp2_pp2_micro_batches_equal_tp1(ckpt, reference):
    got = run_split_script(ckpt, 2, 2, PROMPTS, GREEDY, ARRIVALS, **ENGINE)
    assert got["tokens"] == reference["tokens"]
    assert got["max_micro_batches"] == 2


def test_pp2_abort_stop_tokens_and_max_tokens_1(ckpt, reference):
    """Aborted requests end with "abort" after a prefix of their tokens (one lands while its micro-batch
    is in flight), stop tokens end requests whose next micro-batch may be launched, max_tokens=1."""
    full = reference["tokens"]
    params = [SamplingParams(max_tokens=1, temperature=0) if i % 4 == 0 else
              SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[full[i][5]]) if i % 4 == 1 else GREEDY
              for i in range(len(PROMPTS))]
    aborts = {4: [2], 8: [6], 15: [7]}
    ref = run_script(make_engine(ckpt, **ENGINE), PROMPTS, params, ARRIVALS)
    got = run_split_script(ckpt, 1, 2, PROMPTS, params, ARRIVALS, aborts, **ENGINE)
    assert got["aborted_in_flight"] > 0 and got["used_blocks"] == 0
    for i, toks in enumerate(got["tokens"]):
        if i in (2, 6, 7):
            assert got["reasons"][i] == "abort" and toks == full[i][: len(toks)] and len(toks) < 12
        else:
            assert toks == ref["tokens"][i] and got["reasons"][i] == ref["reasons"][i]
    assert all(len(got["tokens"][i]) == 1 for i in range(0, 12, 4))
    assert all(got["reasons"][i] == "stop" for i in range(1, 12, 4))


def test_pp2_preemption_when_blocks_run_out(ckpt):
    prompts = ramp_prompts(12, seed=8, lo=10, hi=40)
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
    small = dict(ENGINE, kv_tokens=160)
    ref = run_script(make_engine(ckpt, **small), prompts, params)
    got = run_split_script(ckpt, 1, 2, prompts, params, **small)
    assert got["preemptions"] > 0 and got["max_micro_batches"] == 2
    assert got["tokens"] == ref["tokens"]
    assert got["used_blocks"] == 0


OPTS = dict(dtype="float32", max_seq_len=512, max_num_tokens=64, max_batch_size=8,
            kv_cache_config=KvCacheConfig(max_tokens=2048, tokens_per_block=8))


def test_llm_pp2_stop_string_abort_and_shutdown_in_flight(ckpt, reference):
    llm = LLM(ckpt, pipeline_parallel_size=2, **OPTS)
    pids = llm.executor.worker_pids
    try:
        info = llm.executor.engine_info
        assert info["pipeline_parallel_size"] == 2 and info["num_micro_batches"] == 2
        first = [llm.generate_async(p, GREEDY) for p in PROMPTS[:6]]
        first[0].result(timeout=60)
        later = [llm.generate_async(p, GREEDY) for p in PROMPTS[6:]]
        outs = [r.result(timeout=60).outputs[0] for r in first + later]
        assert [o.token_ids for o in outs] == reference["tokens"]

        text = outs[0].text
        stop = text[5:8]
        cut = llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                            stop=[stop]))
        one = llm.generate_async(PROMPTS[1], SamplingParams(max_tokens=1, temperature=0))
        long = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
        gone = llm.generate_async(PROMPTS[2], long, streaming=True)
        next(iter(gone))  # abort at the first chunk, while its next micro-batch may be in flight
        gone.abort()
        c = cut.result(timeout=60).outputs[0]
        assert c.text == text[: text.find(stop)] and c.finish_reason == "stop" and c.stop_reason == stop
        assert one.result(timeout=60).outputs[0].token_ids == reference["tokens"][1][:1]
        assert gone.result(timeout=60).outputs[0].finish_reason == "abort"

        running = [llm.generate_async(p, long) for p in PROMPTS[:6]]  # still generating at shutdown
        time.sleep(1.0)
    finally:
        t0 = time.monotonic()
        llm.shutdown()
        took = time.monotonic() - t0
    assert took < 10
    for r in running:
        with pytest.raises(EngineDeadError):
            r.result(timeout=5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_llm_pp2_killed_rank_fails_pending_requests(ckpt):
    with LLM(ckpt, pipeline_parallel_size=2, **OPTS) as llm:
        pids = llm.executor.worker_pids
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        results = [llm.generate_async(p, long) for p in PROMPTS[:6]]
        time.sleep(0.5)
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        for r in results:  # named after the killed rank, not rank 0's failed receive that it causes
            with pytest.raises(EngineDeadError, match="rank 1 of 2 .*killed by signal SIGKILL"):
                r.result(timeout=10)
        assert time.monotonic() - t0 < 10
        t1 = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - t1 < 10
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


_FAILING_PLUGIN = '''
import os

import torch

from rtllm.kernels.dispatch import register_kernel
from rtllm.kernels.norm import fused_add_rms_norm_torch


@register_kernel("fused_add_rms_norm", device="cpu")
def norm_failing_on_rank1(x, residual, weight, eps):
    dist = torch.distributed
    if dist.is_initialized() and dist.get_rank() == 1 and os.path.exists(os.environ["FAIL_RANK1_FLAG"]):
        raise RuntimeError("injected failure on rank 1")
    return fused_add_rms_norm_torch(x, residual, weight, eps)
'''


def test_llm_pp2_rank_that_raises_is_named_with_its_error(ckpt, tmp_path, monkeypatch):
    """Rank 1 raises mid-generation: rank 0 then fails in its next receive and reports too; every pending
    request fails with rank 1's own error (the earlier report), not rank 0's failed receive."""
    (tmp_path / "failing_rank1_plugin.py").write_text(_FAILING_PLUGIN)
    flag = tmp_path / "fail-now"
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("RTLLM_PLUGINS", "failing_rank1_plugin")
    monkeypatch.setenv("FAIL_RANK1_FLAG", str(flag))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with LLM(ckpt, pipeline_parallel_size=2, **OPTS) as llm:  # the parent loads the plugin too
            long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            results = [llm.generate_async(p, long, streaming=True) for p in PROMPTS[:6]]
            next(iter(results[0]))  # generation is under way
            flag.touch()
            t0 = time.monotonic()
            own_error = "rank 1 of 2 .*failed: RuntimeError: injected failure on rank 1"
            for r in results:
                with pytest.raises(EngineDeadError, match=own_error):
                    r.result(timeout=10)
            assert time.monotonic() - t0 < 10
    finally:
        from rtllm.kernels import dispatch

        dispatch.unregister_kernel("fused_add_rms_norm", device="cpu")
