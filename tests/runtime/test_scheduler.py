"""Scheduler driven by fake sampled tokens: token budget, chunking, admission, preemption."""

from rtllm.config import SchedulerConfig
from rtllm.runtime.kv_cache_manager import KVCacheManager
from rtllm.runtime.request import Request, RequestStatus
from rtllm.runtime.scheduler import Scheduler
from rtllm.sampling_params import SamplingParams


def make(num_blocks=64, bs=4, max_batch=8, budget=32, max_seq=256, chunked=True):
    kv = KVCacheManager(num_blocks, bs)
    return Scheduler(SchedulerConfig(max_batch, budget, max_seq, chunked), kv)


def add(s, rid, n_prompt, max_tokens=4):
    base = 1000 * (1 + len(s.requests))  # distinct prompts: no prefix-cache hits between requests
    r = Request(rid, list(range(base, base + n_prompt)), SamplingParams(max_tokens=max_tokens),
                frozenset({0}), max_tokens)
    s.add_request(r)
    return r


def step(s, token=7):
    b = s.schedule()
    sampled = {r.request_id: token for i, r in enumerate(b.requests) if b.samples(i)}
    return b, s.update(b, sampled)


def test_budget_chunks_long_prompt_and_decodes_first():
    s = make(budget=16)
    a = add(s, "a", 5)
    b0, _ = step(s)
    assert b0.num_new_tokens == [5]
    b = add(s, "b", 40)
    b1, _ = step(s)
    # a decodes (1 token) first, b gets the remaining 15 of the budget
    assert [r.request_id for r in b1.requests] == ["a", "b"] and b1.num_new_tokens == [1, 15]
    b2, _ = step(s)
    assert b2.num_new_tokens == [1, 15]
    b3, ups = step(s)
    assert b3.num_new_tokens == [1, 10] and b.num_output_tokens == 1
    assert a.status == RequestStatus.FINISHED_LENGTH  # 4 tokens
    assert [u.finish_reason for u in ups if u.finished] == ["length"]


def test_no_chunking_waits_for_budget():
    s = make(budget=32, max_seq=32, chunked=False)
    add(s, "a", 20)
    add(s, "b", 20)
    b, _ = step(s)
    assert [r.request_id for r in b.requests] == ["a"]  # b does not fit the rest of the budget whole


def test_max_batch_size_caps_running():
    s = make(max_batch=2)
    for i in range(3):
        add(s, str(i), 3)
    b, _ = step(s)
    assert len(b.requests) == 2 and len(s.waiting) == 1


def test_eos_and_stop_tokens_and_min_tokens():
    s = make()
    r = Request("a", [1, 2], SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[5]),
                frozenset({0}), 10)
    s.add_request(r)
    _, u = step(s, token=0)  # EOS as token 1 of min 2: kept going
    assert not u[0].finished
    _, u = step(s, token=5)  # a stop token as token 2: still within min_tokens
    assert not u[0].finished
    _, u = step(s, token=5)  # token 3: min_tokens satisfied, the stop token ends it
    assert u[0].finished and u[0].finish_reason == "stop" and u[0].stop_reason == 5
    assert s.kv.stats().used_blocks == 0


def test_preemption_by_recompute_when_blocks_run_out():
    s = make(num_blocks=9, bs=4, budget=64)  # 8 usable blocks = 32 tokens; each needs 30, not both
    a = add(s, "a", 10, max_tokens=20)
    b = add(s, "b", 10, max_tokens=20)
    step(s)
    assert a.status == b.status == RequestStatus.RUNNING
    preempted_seen = False
    for _ in range(40):
        batch, _ = step(s)
        if batch.preempted:
            preempted_seen = True
            assert batch.preempted[0] is b  # the most recently admitted goes first
            assert b.num_computed_tokens == 0 and s.waiting[0] is b
        if not s.has_work():
            break
    assert preempted_seen and a.num_output_tokens == 20 and b.num_output_tokens == 20
    assert s.kv.stats().used_blocks == 0


def test_abort_frees_blocks():
    s = make()
    add(s, "a", 9)
    step(s)
    assert s.kv.stats().used_blocks == 3
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert s.kv.stats().used_blocks == 0 and not s.has_work()
