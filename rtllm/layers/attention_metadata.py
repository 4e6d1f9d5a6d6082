"""Per-step attention metadata: built once by the ModelRunner, read by every attention layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Describes one flat batch of T tokens from B sequences.

    Sequences are ordered decodes first (q_len 1), then prefill chunks. For sequence b,
    its new tokens are rows query_start_loc[b]:query_start_loc[b+1] of the flat batch and
    sit at positions seq_lens[b] - q_len_b ... seq_lens[b] - 1. block_tables[b] lists the
    KV blocks of sequence b (padded with 0 beyond its length); slot_mapping[t] is the
    cache slot (block * block_size + offset) where token t's K/V is written.
    """

    num_decodes: int  # leading sequences with exactly one new token
    num_decode_tokens: int  # == num_decodes
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    max_query_len: int
    max_seq_len: int  # over all sequences
    max_decode_seq_len: int  # over the decode sequences (0 if none)
    prefill_query_start_loc: torch.Tensor | None = None  # query_start_loc[num_decodes:] rebased to 0
    _derived: dict[str, Any] = field(default_factory=dict, repr=False)

    def derived(self, key: str, build: Callable[[], Any]) -> Any:
        """A value computed from this step's metadata once and shared by every layer."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
