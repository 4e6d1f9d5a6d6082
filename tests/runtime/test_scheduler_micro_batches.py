"""Scheduler with micro-batches in flight (pipeline parallel): busy requests are neither scheduled nor
preempted, ``max_requests`` caps a batch, and the defaults schedule exactly as before."""

import random

from rtllm.runtime.request import RequestStatus
from tests.runtime.test_scheduler import add, make


def names(batch):
    return [r.request_id for r in batch.requests]


def test_busy_requests_are_skipped_and_the_cap_spreads_the_rest():
    s = make(max_batch=8, budget=64)
    for i in range(6):
        add(s, str(i), 3, max_tokens=8)
    a = s.schedule(max_requests=3)
    assert names(a) == ["0", "1", "2"]
    ra = s.commit(a)  # launched: each has a placeholder for the token it will sample
    b = s.schedule(busy=set(a.requests), max_requests=3)
    assert names(b) == ["3", "4", "5"]
    s.commit(b)
    assert not s.schedule(busy=set(a.requests) | set(b.requests)).requests  # all in flight: nothing
    s.accept(ra, [7, 7, 7])  # a's tokens sampled
    c = s.schedule(busy=set(b.requests), max_requests=3)
    assert names(c) == ["0", "1", "2"] and c.num_new_tokens == [1, 1, 1]


def test_busy_requests_are_never_preempted():
    s = make(num_blocks=9, bs=4, max_batch=8, budget=64)  # 8 usable blocks
    reqs = [add(s, str(i), 8, max_tokens=8) for i in range(4)]  # 2 blocks each: all 8 blocks
    first = s.schedule()
    assert names(first) == ["0", "1", "2", "3"]
    s.update(first, {r.request_id: 7 for r in first.requests})  # each at 9 tokens: the 9th needs a block
    busy = {reqs[2], reqs[3]}  # the newest two are in a micro-batch in flight
    b = s.schedule(busy=busy)
    # request 0 needs a block: the newest request not in flight (1) is preempted, not 3 or 2
    assert [r.request_id for r in b.preempted] == ["1"] and names(b) == ["0"]
    assert all(r.status == RequestStatus.RUNNING and r.block_ids for r in busy)
    # with only busy others left, a request preempts itself rather than a busy one
    s.commit(b)
    s.accept([reqs[0]], [7])
    busy = {reqs[0], reqs[2]}
    before = {r.request_id: list(r.block_ids) for r in busy}
    b2 = s.schedule(busy=busy)
    assert {r.request_id: r.block_ids for r in busy} == before
    assert all(r.status == RequestStatus.RUNNING for r in busy)
    assert "0" not in names(b2) and "2" not in names(b2)


def _drive(s, rng, use_defaults: bool):
    """Run a random workload to the end; the batches as (ids, new tokens)."""
    log = []
    for step_no in range(400):
        if step_no % 3 == 0 and len(s.requests) < 12:
            add(s, f"r{step_no}", rng.randint(2, 40), max_tokens=rng.randint(1, 10))
        b = s.schedule() if use_defaults else s.schedule(busy=set(), max_requests=None)
        log.append((names(b), list(b.num_new_tokens), [r.request_id for r in b.preempted]))
        s.update(b, {r.request_id: 7 for i, r in enumerate(b.requests) if b.samples(i)})
        if not s.has_work() and step_no > 60:
            break
    return log


def test_defaults_schedule_as_before():
    a = _drive(make(num_blocks=12, bs=4, max_batch=5, budget=24), random.Random(3), True)
    b = _drive(make(num_blocks=12, bs=4, max_batch=5, budget=24), random.Random(3), False)
    assert a == b and any(p for _, _, p in a)  # preemptions happened
