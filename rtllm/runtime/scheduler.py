"""Inflight-batching scheduler with a token budget, chunked prefill, prefix reuse and preemption.

There are no prefill/decode phases: each step, every request's num_computed_tokens catches up
with its num_tokens under the step's token budget (max_num_tokens). Running requests are served
first, in admission order; waiting requests are admitted FCFS while budget, batch slots and KV
blocks last. When blocks run out, the most recently admitted running request is preempted: its
blocks are freed and it goes back to the head of the queue to be recomputed later.
The scheduler needs no model: tests drive it with fake sampled tokens.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from rtllm.config import SchedulerConfig
from rtllm.runtime.kv_cache_manager import KVCacheManager
from rtllm.runtime.request import PLACEHOLDER, Request, RequestStatus


@dataclass
class ScheduledBatch:
    """One step's work. Requests are ordered decodes (one new token) first, then prefill chunks."""

    requests: list[Request]
    num_new_tokens: list[int]
    preempted: list[Request] = field(default_factory=list)

    @functools.cached_property
    def query_starts(self) -> list[int]:
        """Offset of each request's first new token in the flat batch, plus the total: [B + 1]."""
        return [0, *itertools.accumulate(self.num_new_tokens)]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether request i reaches the end of its tokens this step (so its last logit is sampled)."""
        r = self.requests[i]
        return r.num_computed_tokens + self.num_new_tokens[i] == r.num_tokens

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class RequestUpdate:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id, when one stopped it
    logprob: float | None = None  # raw logprob of the new token (when asked)
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list | None = None  # per prompt position: (logprob of the token, top-k) or None
    num_cached_tokens: int = 0
    scheduled_time: float | None = None  # time.monotonic() (system-wide) when the request was first scheduled
    error: str | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.prefill_tokens_computed = 0  # prompt/recompute tokens computed, for stats and tests
        self.num_preemptions = 0

    # -- queue management -----------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        return req

    # -- one step -------------------------------------------------------------------------
    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self, busy: Collection[Request] = (), max_requests: int | None = None) -> ScheduledBatch:
        """The next step's batch. Pipeline micro-batches (several batches in flight): ``busy`` are the
        requests of batches launched whose tokens are not sampled yet; they are neither scheduled nor
        preempted (their KV blocks stay theirs). ``max_requests`` caps the batch's requests, so the
        running requests spread over the micro-batches. The defaults are one batch at a time."""
        cfg = self.config
        budget = cfg.max_num_tokens
        chosen: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        room = max_requests if max_requests is not None else cfg.max_batch_size

        for req in list(self.running):
            if req.status != RequestStatus.RUNNING or req.length_pending:  # preempted here / last token pending
                continue
            if busy and req in busy:
                continue
            if len(chosen) >= room:
                break
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running[-1]
                if busy and victim in busy:  # the newest request not in flight (``req`` at worst)
                    victim = next(r for r in reversed(self.running) if r not in busy)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                chosen.append((req, num_new))
                budget -= num_new

        if not preempted:
            self._admit(chosen, budget, room)

        # decodes first, then prefill chunks (the attention layer splits the batch there)
        chosen.sort(key=lambda rn: rn[1] != 1 or rn[0].num_tokens - rn[0].num_computed_tokens != 1)
        return ScheduledBatch([r for r, _ in chosen], [n for _, n in chosen], preempted)

    def _admit(self, chosen: list[tuple[Request, int]], budget: int, room: int) -> None:
        cfg = self.config
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < cfg.max_batch_size and len(chosen) < room:
            req = self.waiting[0]
            leader = req.wait_for
            if leader is not None and not leader.is_finished and not leader.prefill_done:
                skipped.append(self.waiting.popleft())  # let its sibling fill the prefix cache first
                continue
            if req.num_placeholders:  # preempted with a token still in flight: recompute once it lands
                skipped.append(self.waiting.popleft())
                continue
            blocks, num_cached = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_cached
            if num_new > budget and not cfg.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new, blocks):
                break
            self.waiting.popleft()
            req.wait_for = None
            req.num_computed_tokens = num_cached
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_cached
                if req.scheduled_time is None:
                    req.scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chosen.append((req, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def commit(self, batch: ScheduledBatch) -> list[Request]:
        """The step's work has been launched: advance computed counts and, for every request that
        samples, append a PLACEHOLDER for the token still on the device. Returns those requests.

        A request whose pending token will be its last (max_tokens, max_seq_len) is marked
        length_pending and not scheduled again; EOS and stop tokens are only known in accept()."""
        sampling: list[Request] = []
        for i, (req, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            samples = batch.samples(i)
            if req.is_finished or req.request_id not in self.requests:
                continue  # aborted while the step was being prepared
            if req.num_computed_tokens < req.num_prompt_tokens:
                self.prefill_tokens_computed += min(num_new, req.num_prompt_tokens - req.num_computed_tokens)
            req.num_computed_tokens += num_new
            if samples:
                req.token_ids.append(PLACEHOLDER)
                req.num_placeholders += 1
                if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_seq_len:
                    req.length_pending = True
                sampling.append(req)
            self.kv.cache_full_blocks(req)
        return sampling

    def accept(self, reqs: list[Request], tokens: list[int]) -> list[RequestUpdate]:
        """The sampled tokens of a committed step arrived: fill each request's oldest placeholder,
        apply EOS / stop ids / length, free finished requests. ``tokens[i]`` belongs to ``reqs[i]``."""
        updates: list[RequestUpdate] = []
        max_seq_len = self.config.max_seq_len
        for req, tok in zip(reqs, tokens):
            if req.is_finished or req.request_id not in self.requests:
                continue  # aborted or finished while the step ran: its token is dropped
            pos = req.num_tokens - req.num_placeholders
            req.token_ids[pos] = tok
            req.num_placeholders -= 1
            self.kv.cache_full_blocks(req)
            params = req.sampling_params
            n_out = pos + 1 - req.num_prompt_tokens  # output tokens up to and including this one
            reason = None
            if not params.ignore_eos and tok in req.eos_token_ids and n_out > params.min_tokens:
                reason = "stop"
            elif params.stop_token_ids and tok in params.stop_token_ids and n_out > params.min_tokens:
                reason, req.stop_reason = "stop", tok
            elif n_out >= req.max_tokens or pos + 1 >= max_seq_len:
                reason = "length"
            if reason is not None:
                del req.token_ids[pos + 1 :]  # a later step's placeholder for a finished request
                req.num_placeholders = 0
                status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH
                self.finish_request(req.request_id, status)
            updates.append(RequestUpdate(req.request_id, [tok], reason is not None, reason, req.stop_reason,
                                         num_cached_tokens=req.num_cached_tokens,
                                         scheduled_time=req.scheduled_time if n_out == 1 else None))
        return updates

    def update(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[RequestUpdate]:
        """Synchronous step: commit() then accept() at once. ``sampled``: request id -> its token."""
        reqs = self.commit(batch)
        return self.accept(reqs, [sampled[r.request_id] for r in reqs])
