"""The model runner of one rank when the model is split across ranks (tensor / pipeline parallel).

Rank 0 owns the scheduler and the sampler; every rank owns its slice of the model and of the KV
cache (its heads of its layers). One step:

1. rank 0 packs the scheduled batch into a ``DistStep`` (the host lists the ModelRunner builds its
   tensors from: token ids, positions, slot mapping, block table, sequence lengths, plus the flat
   rows whose logits are needed) and broadcasts it, pickled, over the gloo group
   (rtllm.parallel.comm.broadcast_object); the other ranks wait for it in ``follow()``;
2. every rank builds the same input tensors and AttentionMetadata. Placeholder inputs of overlap
   scheduling (the previous step's tokens, still on rank 0's device) are filled on rank 0 and the id
   tensor is broadcast on the device group;
3. pipeline stages run in order: a stage after the first receives the residual stream from the
   previous stage (point to point), runs its layers and sends it on; inside a stage the tensor-parallel
   layers all-reduce / all-gather among themselves;
4. the last stage computes the logits of the needed rows only (the vocab-parallel LM head gathers
   them over its tp group); with pipeline stages, its tp rank 0 sends them to rank 0, which samples.

A ``None`` broadcast stops the followers (shutdown). The same code runs on gloo (CPU) and NCCL.
Not yet: several micro-batches in flight between pipeline stages (a stage idles while the others
run), CUDA graphs with collectives inside (the PyExecutor captures none when world_size > 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtllm.parallel import comm
from rtllm.parallel.mapping import Mapping
from rtllm.runtime.model_runner import ModelOutput, ModelRunner, PendingTokens, StepPlan
from rtllm.runtime.scheduler import ScheduledBatch


@dataclass
class DistStep:
    plan: StepPlan
    logit_rows: list[int]  # flat token indices whose logits are computed: sampled rows, then prompt-logprob rows


class DistributedModelRunner(ModelRunner):
    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, block_size: int,
                 kv_dtype: torch.dtype | None, mapping: Mapping) -> None:
        super().__init__(model, device, dtype, block_size, kv_dtype)
        self.mapping = mapping
        self.hidden_size = model.config.hidden_size
        self.last_stage_rank = (mapping.pp_size - 1) * mapping.tp_size  # its tp rank 0 sends logits to rank 0

    @property
    def is_driver(self) -> bool:
        return self.mapping.rank == 0

    # -- rank 0 -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, prev: PendingTokens | None = None) -> ModelOutput:
        """Rank 0: broadcast the step, run this rank's part, return the logits rank 0 samples from.
        (Other ranks call it only where every rank runs the same batch, e.g. a profiling pass.)"""
        step = None
        if self.is_driver:
            starts = batch.query_starts
            sample_rows = [i for i in range(len(batch)) if batch.samples(i)]
            rows = [starts[i + 1] - 1 for i in sample_rows]
            spans = self._prompt_spans(batch)
            for _, start, count, _, _ in spans:
                rows.extend(range(start, start + count))
            step = DistStep(self.pack(batch, prev), rows)
        step = comm.broadcast_object(step)
        logits = self._forward(step, prev)
        if not self.is_driver:
            return ModelOutput(torch.empty(0, self.vocab_size), [], {})
        n = len(sample_rows)
        prompt_logits = {}
        for i, _, count, targets, first in spans:
            prompt_logits[i] = (logits[n : n + count], targets, first)
            n += count
        return ModelOutput(logits[: len(sample_rows)], sample_rows, prompt_logits)

    @staticmethod
    def _prompt_spans(batch: ScheduledBatch) -> list[tuple[int, int, int, list[int], int]]:
        """(batch index, first flat row, rows, target ids, first position) of each prompt-logprob span."""
        spans = []
        starts = batch.query_starts
        for i, req in enumerate(batch.requests):
            if req.sampling_params.prompt_logprobs is None:
                continue
            c, n = req.num_computed_tokens, batch.num_new_tokens[i]
            last = min(c + n, req.num_prompt_tokens - 1)  # positions c..last-1 predict prompt tokens
            if last > c:
                spans.append((i, starts[i], last - c, req.token_ids[c + 1 : last + 1], c))
        return spans

    def stop_followers(self) -> None:
        """Rank 0: tell every other rank to leave its follow loop."""
        comm.broadcast_object(None)

    # -- every other rank ---------------------------------------------------------------------------
    @torch.inference_mode()
    def follow(self) -> bool:
        """Wait for rank 0's next step and run this rank's part of it; False when rank 0 stops."""
        step = comm.broadcast_object(None)
        if step is None:
            return False
        self._forward(step, None)
        return True

    # -- every rank ------------------------------------------------------------------------------------
    def _forward(self, step: DistStep, prev: PendingTokens | None) -> torch.Tensor | None:
        m = self.mapping
        ids, pos, meta = self.to_device(step.plan, prev)
        if step.plan.pending:
            comm.broadcast_tensor(ids)  # rank 0 filled the previous step's tokens on its device
        hidden_in = None
        if not m.is_first_pp_rank():
            hidden_in = comm.recv_tensor((ids.shape[0], self.hidden_size), self.dtype, m.prev_pp_rank())
        hidden = self.model(ids, pos, meta, hidden_in) if m.pp_size > 1 else self.model(ids, pos, meta)
        num_rows = len(step.logit_rows)
        if not m.is_last_pp_rank():
            comm.send_tensor(hidden, m.next_pp_rank())
            if self.is_driver and num_rows:
                return comm.recv_tensor((num_rows, self.vocab_size), torch.float32, self.last_stage_rank)
            return None
        if not num_rows:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        idx = torch.tensor(step.logit_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden.index_select(0, idx)).float()
        if m.pp_size > 1 and m.rank == self.last_stage_rank:
            comm.send_tensor(logits, 0)
        return logits
