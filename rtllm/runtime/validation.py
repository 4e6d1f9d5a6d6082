"""Request admission checks, shared by every executor.

A RequestValidator holds only the engine's fixed limits (vocabulary size, max_seq_len, KV
capacity), so an executor that runs the engine in another process can build one from the
limits the worker reports and reject a bad request in the caller's thread, before it is queued,
with exactly the message the in-process executor gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rtllm.errors import InvalidRequestError
from rtllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestValidator:
    """Invariant: the limits never change after the engine is built (the KV pool is fixed)."""

    vocab_size: int
    max_seq_len: int
    kv_capacity_tokens: int

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> RequestValidator:
        """Build from an engine-info dict (``PyExecutor.info()``)."""
        return cls(info["vocab_size"], info["max_seq_len"], info["kv_capacity_tokens"])

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reject a request that can never run, raising InvalidRequestError naming the problem."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        vocab = self.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        max_seq_len = self.max_seq_len
        n = len(prompt_token_ids)
        if n >= max_seq_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; max_seq_len={max_seq_len} leaves no room to generate")
        if n + params.min_tokens > max_seq_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + min_tokens ({params.min_tokens}) exceeds max_seq_len={max_seq_len}")
        capacity = self.kv_capacity_tokens
        if n + 1 > capacity:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the KV cache holds {capacity} tokens in all")
