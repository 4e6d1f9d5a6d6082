"""A launched engine step and what becomes of it: the sampled tokens' copy to the host started at launch
(track_tokens), then read back and applied to the scheduler's requests as RequestUpdates (apply_tokens),
with the per-token and prompt logprobs that go with them. rtllm.runtime.py_executor launches the steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtllm.runtime.model_runner import PendingTokens
from rtllm.runtime.request import Request, RequestStatus
from rtllm.runtime.sampler import SamplerOutput, SamplingRow, compute_logprobs
from rtllm.runtime.scheduler import RequestUpdate, ScheduledBatch, Scheduler


@dataclass
class LaunchedStep:
    """A step whose model and sampler work has been launched (and committed to the scheduler)."""

    batch: ScheduledBatch
    reqs: list[Request]  # requests that sample, in the order of their tokens
    sampled: SamplerOutput | None
    prompt_lp: dict[str, list]
    rows: list[SamplingRow]
    pending: PendingTokens | None = None
    host: torch.Tensor | None = None
    event: torch.cuda.Event | None = None


def track_tokens(launched: LaunchedStep, out) -> LaunchedStep:
    """Where each request's sampled token is (the next step may read it on the device), and the copy of
    the tokens to the host started now; apply_tokens waits for it."""
    sampled, batch = launched.sampled, launched.batch
    if sampled is not None:
        tokens = sampled.token_ids
        launched.pending = PendingTokens(tokens, {batch.requests[i].request_id: j
                                                  for j, i in enumerate(out.sample_rows)})
        if tokens.is_cuda:  # start the copy to the host now; wait for it only in apply_tokens
            launched.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            launched.host.copy_(tokens, non_blocking=True)
            launched.event = torch.cuda.Event()
            launched.event.record()
    return launched


def apply_tokens(launched: LaunchedStep, scheduler: Scheduler) -> list[RequestUpdate]:
    """Read a launched step's tokens back and apply them (stop rules, freeing, updates)."""
    sampled = launched.sampled
    updates: list[RequestUpdate] = []
    if sampled is not None:
        if launched.event is not None:
            launched.event.synchronize()
            toks = launched.host.tolist()
        else:
            toks = sampled.token_ids.tolist()
        by_id = {rid: toks[j] for rid, j in launched.pending.row_of.items()}
        extra: dict[str, tuple] = {}
        if sampled.logprobs is not None:
            for rid, j in launched.pending.row_of.items():
                if launched.rows[j].params.logprobs is not None:
                    extra[rid] = (float(sampled.logprobs[j]), sampled.top_logprobs[j])
        updates = scheduler.accept(launched.reqs, [by_id[r.request_id] for r in launched.reqs])
        for u in updates:
            if u.request_id in extra:
                u.logprob, u.top_logprobs = extra[u.request_id]
        if sampled.errors:  # a logits processor failed: that request ends with the error, the rest go on
            failed = {rid: sampled.errors[j] for rid, j in launched.pending.row_of.items() if j in sampled.errors}
            for rid in failed:
                scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            updates = [u for u in updates if u.request_id not in failed]
            updates += [RequestUpdate(rid, [], True, "error", error=msg) for rid, msg in failed.items()]
    prompt_lp = launched.prompt_lp
    for u in updates:
        if u.request_id in prompt_lp:
            u.prompt_logprobs = prompt_lp.pop(u.request_id)
    for rid, lp in prompt_lp.items():  # a prefill chunk that did not sample yet
        updates.append(RequestUpdate(rid, [], False, prompt_logprobs=lp))
    return updates


def prompt_logprobs(batch: ScheduledBatch, out) -> dict[str, list]:
    """request id -> the prompt logprobs of this step's chunk (None first for a prompt's first token)."""
    result: dict[str, list] = {}
    for i, (logits, targets, first) in out.prompt_logits.items():
        req = batch.requests[i]
        k = req.sampling_params.prompt_logprobs
        lps, tops = compute_logprobs(logits, k, torch.tensor(targets, device=logits.device))
        entries = [(float(lp), top) for lp, top in zip(lps.tolist(), tops)]
        result[req.request_id] = ([None] if first == 0 else []) + entries
    return result
