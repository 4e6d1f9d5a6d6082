"""ModelRunner: packs a scheduled batch flat, builds attention metadata once, runs the model.

Owns the paged KV cache tensors (one [2, num_blocks, block_size, Hkv, D] pool per layer, carved
from one allocation) and binds them to the model's attention layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rtllm.layers.attention_metadata import AttentionMetadata
from rtllm.layers.linear import use_fast_weight_layouts
from rtllm.runtime.cuda_graph import DecodeGraphs
from rtllm.runtime.request import PLACEHOLDER, Request
from rtllm.runtime.scheduler import ScheduledBatch
from rtllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class PendingTokens:
    """Sampled token ids of a launched step, still on the device: row_of[request id] -> row."""

    tokens: torch.Tensor  # [S] int64, on the model's device
    row_of: dict[str, int]


@dataclass
class StepPlan:
    """One step's model inputs as host lists (picklable: under tensor / pipeline parallelism rank 0
    broadcasts it, and every rank builds the same tensors from it)."""

    input_ids: list[int]  # PLACEHOLDER where ``pending`` fills the previous step's token on the device
    positions: list[int]
    slots: list[int]
    query_starts: list[int]
    seq_lens: list[int]
    block_table: list[list[int]]
    num_decodes: int
    max_query_len: int
    pending: list[tuple[int, int]]  # (flat index, row in the previous step's PendingTokens.tokens)


@dataclass
class ModelOutput:
    sample_logits: torch.Tensor  # [S, V] float32: last-position logits of requests that sample
    sample_rows: list[int]  # batch index of each sample_logits row
    prompt_logits: dict[int, tuple[torch.Tensor, list[int], int]]  # batch idx -> (logits, targets, first pos)


def kv_cache_dtype(model_dtype: torch.dtype, quant_config: object | None, built_kv_algo: str | None = None,
                   ) -> torch.dtype:
    """The KV pool's dtype: float8_e4m3fn under QuantConfig(kv_cache_quant_algo="FP8") or for an engine
    directory built with it (``built_kv_algo``), else the model's."""
    if "FP8" in (getattr(quant_config, "kv_cache_quant_algo", None), built_kv_algo):
        return torch.float8_e4m3fn
    return model_dtype


def kv_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """K and V bytes of one token over every layer, in a cache of ``dtype``."""
    layers = model.attention_layers()
    a = layers[0]
    return 2 * len(layers) * a.num_kv_heads * a.head_dim * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, block_size: int,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        packed, packed_bytes, laid_out = use_fast_weight_layouts(model)
        if packed:
            logger.info("%d weights packed for oneDNN's CPU GEMM: %.1f MiB of copies beside the weights "
                        "(RTLLM_CPU_PACKED_WEIGHTS=0: none)", packed, packed_bytes / 2**20)
        if laid_out:
            logger.info("%d weights laid out column-major for this CPU's fp32 GEMM", laid_out)
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # the KV pool's (float8_e4m3fn for an FP8 KV cache)
        self.block_size = block_size
        self.vocab_size = model.config.vocab_size
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None

    def allocate_kv_cache(self, num_blocks: int, quiet: bool = False) -> None:
        layers = self.model.attention_layers()
        a = layers[0]
        shape = (len(layers), 2, num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache = self.kv_cache[i, 0]
            layer.v_cache = self.kv_cache[i, 1]
        self.num_blocks = num_blocks
        if not quiet:
                logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB, %s", num_blocks, self.block_size,
                        num_blocks * self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**20,
                        str(self.kv_dtype).removeprefix("torch."))

    @torch.inference_mode()
    def profile_peak_bytes(self, max_num_tokens: int, max_batch_size: int) -> int:
        """Run one worst-case step (max_num_tokens of prefill, max_batch_size sampled rows) on a
        throwaway KV pool; returns the activation memory it needed above the weights (bytes)."""
        bs = self.block_size
        n_seqs = max(1, min(max_batch_size, max_num_tokens))
        per_seq = max_num_tokens // n_seqs
        lens = [per_seq] * n_seqs
        lens[-1] += max_num_tokens - per_seq * n_seqs
        blocks_needed = sum(-(-n // bs) for n in lens) + 1
        self.allocate_kv_cache(blocks_needed, quiet=True)
        reqs, nxt = [], 1
        params = SamplingParams(max_tokens=1)
        for i, n in enumerate(lens):
            r = Request(f"profile-{i}", [0] * n, params, frozenset(), 1)
            nb = -(-n // bs)
            r.block_ids = list(range(nxt, nxt + nb))
            nxt += nb
            reqs.append(r)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.execute(ScheduledBatch(reqs, lens))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.release_kv_cache()
        torch.cuda.empty_cache()
        return peak

    def release_kv_cache(self) -> None:
        for layer in self.model.attention_layers():
            layer.k_cache = layer.v_cache = None
        self.kv_cache = None
        self.num_blocks = 0

    def capture_cuda_graphs(self, sizes: list[int], max_seq_len: int) -> float:
        if self.device.type != "cuda" or not sizes:
            return 0.0
        self.graphs = DecodeGraphs(self.model, self.device, sizes, max_seq_len, self.block_size)
        self.graphs.capture()
        return self.graphs.capture_seconds

    # -- packing --------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, prev: PendingTokens | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat inputs and metadata. A PLACEHOLDER input (overlap scheduling: the previous step's
        token, still on the device) is filled on the device from ``prev``."""
        return self.to_device(self.pack(batch, prev), prev)

    def pack(self, batch: ScheduledBatch, prev: PendingTokens | None = None) -> StepPlan:
        """The batch as flat host lists (decodes first, as scheduled)."""
        bs = self.block_size
        pending: list[tuple[int, int]] = []  # (flat index, row in prev.tokens)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = batch.query_starts
        seq_lens: list[int] = []
        num_decodes = 0
        for req, n in zip(batch.requests, batch.num_new_tokens):
            c = req.num_computed_tokens
            seg = req.token_ids[c : c + n]
            if req.num_placeholders and seg and seg[-1] == PLACEHOLDER:
                if prev is None or req.request_id not in prev.row_of or PLACEHOLDER in seg[:-1]:
                    raise RuntimeError(f"request {req.request_id}: input token not known (overlap invariant)")
                pending.append((len(input_ids) + n - 1, prev.row_of[req.request_id]))
            input_ids.extend(seg)
            positions.extend(range(c, c + n))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(c, c + n))
            seq_lens.append(c + n)
            if n == 1 and len(seq_lens) == num_decodes + 1 and c + 1 == req.num_tokens:
                num_decodes += 1
        max_blocks = max(len(r.block_ids) for r in batch.requests)
        table = [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in batch.requests]
        return StepPlan(input_ids, positions, slots, starts, seq_lens, table, num_decodes, max(batch.num_new_tokens),
                        pending)

    def to_device(self, plan: StepPlan, prev: PendingTokens | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Input ids, positions and AttentionMetadata on the device; PLACEHOLDER inputs filled from
        ``prev`` when given (a rank without it receives them from rank 0)."""
        starts, seq_lens, num_decodes, pending = plan.query_starts, plan.seq_lens, plan.num_decodes, plan.pending
        input_ids, positions, slots, table = plan.input_ids, plan.positions, plan.slots, plan.block_table
        dev = self.device
        qsl = torch.tensor(starts, dtype=torch.int32)
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            num_decode_tokens=num_decodes,
            query_start_loc=qsl.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.tensor(table, dtype=torch.int32).to(dev, non_blocking=True),
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            max_query_len=plan.max_query_len,
            max_seq_len=max(seq_lens),
            max_decode_seq_len=max(seq_lens[:num_decodes], default=0),
            prefill_query_start_loc=(qsl[num_decodes:] - starts[num_decodes]).to(dev, non_blocking=True)
            if num_decodes < len(seq_lens) else None,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        if pending and prev is not None:
            dst = torch.tensor([d for d, _ in pending], dtype=torch.int64).to(dev, non_blocking=True)
            src = torch.tensor([r for _, r in pending], dtype=torch.int64).to(dev, non_blocking=True)
            ids.index_copy_(0, dst, prev.tokens.index_select(0, src))
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, pos, meta

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, prev: PendingTokens | None = None) -> ModelOutput:
        ids, pos, meta = self.prepare(batch, prev)
        graphs = self.graphs
        if graphs is not None and meta.num_decodes == len(batch) and len(batch) <= graphs.max_bs:
            logits = graphs.replay(ids, pos, meta).float()
            return ModelOutput(logits, list(range(len(batch))), {})
        hidden = self.model(ids, pos, meta)
        starts = batch.query_starts
        sample_rows = [i for i in range(len(batch)) if batch.samples(i)]
        idx = torch.tensor([starts[i + 1] - 1 for i in sample_rows], dtype=torch.int64, device=self.device)
        sample_logits = self.model.compute_logits(hidden.index_select(0, idx)).float()
        prompt_logits: dict[int, tuple[torch.Tensor, list[int], int]] = {}
        for i, req in enumerate(batch.requests):
            if req.sampling_params.prompt_logprobs is None:
                continue
            c, n = req.num_computed_tokens, batch.num_new_tokens[i]
            last = min(c + n, req.num_prompt_tokens - 1)  # positions c..last-1 predict prompt tokens
            if last <= c:
                continue
            h = hidden[starts[i] : starts[i] + (last - c)]
            prompt_logits[i] = (self.model.compute_logits(h).float(), req.token_ids[c + 1 : last + 1], c)
        return ModelOutput(sample_logits, sample_rows, prompt_logits)
