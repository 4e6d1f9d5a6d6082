"""CUDA graphs for decode steps.

Captured once per batch size of a ladder (largest first, sharing one memory pool). A decode batch
of B requests replays the graph of the smallest captured size >= B; padded rows have seq_len 0
(attention returns zeros for them), slot -1 (the cache write skips them) and token 0. The decode
attention's split count depends on max_seq_len, so graphs are captured with the engine's
max_seq_len and replays read the per-row lengths from the static seq_lens buffer.
"""

from __future__ import annotations

import logging
import time

import torch

from rtllm.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, device: torch.device, sizes: list[int], max_seq_len: int,
                 block_size: int) -> None:
        self.model = model
        self.device = device
        self.sizes = sorted(sizes)
        self.max_bs = self.sizes[-1]
        self.max_seq_len = max_seq_len
        self.max_blocks = -(-max_seq_len // block_size)
        bs = self.max_bs
        self.input_ids = torch.zeros(bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(bs, self.max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_decodes=b, num_decode_tokens=b, query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:b],
            max_query_len=1, max_seq_len=self.max_seq_len, max_decode_seq_len=self.max_seq_len)

    def _run(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self._meta(b))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        for b in reversed(self.sizes):
            self._run(b)  # warm-up: Triton compilation and autotuning happen outside the capture
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._run(b)
            pool = g.pool()
            self.graphs[b] = g
            self.outputs[b] = out
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s", len(self.sizes), self.sizes,
                    self.capture_seconds)

    def padded_size(self, b: int) -> int | None:
        for s in self.sizes:
            if s >= b:
                return s
        return None

    def replay(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [B, V] for a decode-only batch of B <= max captured size."""
        b = ids.shape[0]
        g = self.padded_size(b)
        self.input_ids[:b].copy_(ids, non_blocking=True)
        self.positions[:b].copy_(pos, non_blocking=True)
        self.slot_mapping[:b].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:b].copy_(meta.seq_lens, non_blocking=True)
        w = meta.block_tables.shape[1]
        self.block_tables[:b, :w].copy_(meta.block_tables, non_blocking=True)
        if g > b:  # padding rows: no KV, no cache write
            self.seq_lens[b:g].zero_()
            self.slot_mapping[b:g].fill_(-1)
        self.graphs[g].replay()
        return self.outputs[g][:b]
