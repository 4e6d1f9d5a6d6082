"""A logits processor factory: ``ban_tokens`` never lets the listed token ids be sampled.

Requests name it (JSON-friendly, works across the engine's process boundary):
``SamplingParams(logits_processors=[{"name": "ban_tokens", "kwargs": {"token_ids": [42]}}])``.
Each request gets its own ``BanTokens`` (the factory runs once per request, in the engine's process).
"""

from __future__ import annotations

import torch

from rtllm.logits_processors import register_logits_processor_factory


class BanTokens:
    def __init__(self, token_ids: list[int]) -> None:
        if not token_ids or not all(isinstance(t, int) and t >= 0 for t in token_ids):
            raise ValueError(f"token_ids must be a non-empty list of token ids, got {token_ids!r}")
        self.token_ids = list(token_ids)
        self._index: torch.Tensor | None = None

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self._index is None or self._index.device != logits.device:
            self._index = torch.tensor(self.token_ids, dtype=torch.int64, device=logits.device)
        logits.index_fill_(0, self._index, float("-inf"))
        return logits


def register() -> None:
    register_logits_processor_factory("ban_tokens", BanTokens)
