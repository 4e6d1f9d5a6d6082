"""Runtime request state: one sequence being generated."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from rtllm.sampling_params import SamplingParams

PLACEHOLDER = -1  # a token id not known on the host yet (overlap scheduling)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)  # identity semantics: requests sit in lists and sets compared per step
class Request:
    """One sequence. ``token_ids`` = prompt + generated tokens; ``num_computed_tokens`` of them
    have their K/V in the cache. A request is "prefilling" while num_computed_tokens + 1 <
    num_tokens and "decoding" when exactly one token (the last sampled) is left to compute.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int  # resolved output budget (params.max_tokens capped by max_seq_len)
    generator: torch.Generator | None = None
    wait_for: Request | None = None  # a sibling (n > 1) whose prompt blocks this one reuses
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    scheduled_time: float | None = None  # time.monotonic() when first scheduled (the end of its queue time)
    num_preemptions: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of this request's full blocks
    stop_reason: int | None = None
    # Overlap scheduling: a sampled token whose value is still on the GPU sits in token_ids as
    # PLACEHOLDER; num_placeholders of them trail token_ids. length_pending: the pending token is
    # the request's last (max_tokens / max_seq_len), so it is not scheduled again.
    num_placeholders: int = 0
    length_pending: bool = False
    # this request's resolved logits processors (rtllm.logits_processors.BoundProcessor), made at admission
    logits_processors: list = field(default_factory=list)
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens
