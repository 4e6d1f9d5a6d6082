"""GenerationRequest: what a client submits to an executor."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from rtllm.sampling_params import SamplingParams

_ids = itertools.count()


@dataclass
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    streaming: bool = False
    request_id: int = field(default_factory=lambda: next(_ids))
