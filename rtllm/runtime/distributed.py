"""The model runner of one rank when the model is split across ranks (tensor / pipeline parallel).

Rank 0 owns the scheduler and the sampler; every rank owns its slice of the model and of the KV
cache (its heads of its layers). One micro-batch (a scheduled batch):

1. rank 0 packs it into a ``DistStep`` (the host lists the ModelRunner builds its tensors from: token
   ids, positions, slot mapping, block table, sequence lengths, plus the flat rows whose logits are
   needed) and sends it, pickled, to every other rank over the gloo group, without waiting for it to
   arrive (rtllm.parallel.comm.isend_object); the other ranks take the next one in ``follow()``;
2. every rank builds the same input tensors and AttentionMetadata. Placeholder inputs of overlap
   scheduling (the previous step's tokens, still on rank 0's device) are filled on rank 0 and the id
   tensor is broadcast over the first stage's tp group (later stages take no ids);
3. a stage after the first receives the residual stream from the previous stage, runs its layers and
   sends it on without waiting (point to point, one group per link); inside a stage the
   tensor-parallel layers all-reduce / all-gather among themselves;
4. the last stage computes the logits of the needed rows only (the vocab-parallel LM head gathers
   them over its tp group); with pipeline stages, its tp rank 0 sends them to rank 0, which samples.

Micro-batches in flight (pipeline parallel): ``launch(batch)`` does 1-3 on rank 0 and returns at
once when stage 0 has run; ``finish(handle)`` waits for its logits. Between the two, rank 0 can
launch the next micro-batch on stage 0 while later stages still run this one (the PyExecutor keeps
up to ``num_micro_batches`` launched). Every rank runs micro-batches in the order rank 0 launched
them (steps and residual streams arrive in order on each link), so KV blocks written by one
micro-batch are written before any later micro-batch reads or reuses them, on every rank.
``execute`` = launch + finish (one micro-batch at a time).

A ``None`` step stops the followers (shutdown; rank 0 first finishes what it launched). The same
code runs on gloo (CPU) and NCCL. Not yet: CUDA graphs with collectives inside (the PyExecutor
captures none when world_size > 1).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from rtllm.parallel import comm
from rtllm.parallel.mapping import Mapping
from rtllm.runtime.model_runner import ModelOutput, ModelRunner, PendingTokens, StepPlan
from rtllm.runtime.scheduler import ScheduledBatch

_MAX_PENDING_SENDS = 8  # a follower's sends not yet known to have arrived, before it waits on the oldest


@dataclass
class DistStep:
    plan: StepPlan
    logit_rows: list[int]  # flat token indices whose logits are computed: sampled rows, then prompt-logprob rows
    seq: int = 0  # rank 0's micro-batch number (checked on the followers: they run them in order)


@dataclass
class Launched:
    """Rank 0: a micro-batch whose stage-0 part has run; ``finish`` turns it into a ModelOutput."""

    step: DistStep
    sample_rows: list[int]
    spans: list[tuple[int, int, int, list[int], int]]
    logits: torch.Tensor | None = None  # computed here (pp_size 1: rank 0 is the last stage)
    sent: comm.Sent = field(default_factory=comm.Sent)


class DistributedModelRunner(ModelRunner):
    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, block_size: int,
                 kv_dtype: torch.dtype | None, mapping: Mapping) -> None:
        super().__init__(model, device, dtype, block_size, kv_dtype)
        self.mapping = mapping
        self.hidden_size = model.config.hidden_size
        self.last_stage_rank = (mapping.pp_size - 1) * mapping.tp_size  # its tp rank 0 sends logits to rank 0
        self._seq = 0  # micro-batches launched (rank 0) / run (followers)
        self._sending: deque[comm.Sent] = deque()  # a follower's outputs on their way
        self._unconfirmed: deque[comm.Sent] = deque()  # rank 0: sends of finished micro-batches

    def _wait_sends(self) -> None:
        while self._unconfirmed:
            self._unconfirmed.popleft().wait()

    @property
    def is_driver(self) -> bool:
        return self.mapping.rank == 0

    # -- rank 0 -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: PendingTokens | None = None) -> Launched:
        """Rank 0: send the step to every rank and run stage 0's part (its output goes on to stage 1
        without waiting). Returns once this rank is free for the next micro-batch."""
        starts = batch.query_starts
        sample_rows = [i for i in range(len(batch)) if batch.samples(i)]
        rows = [starts[i + 1] - 1 for i in sample_rows]
        spans = self._prompt_spans(batch)
        for _, start, count, _, _ in spans:
            rows.extend(range(start, start + count))
        self._seq += 1
        step = DistStep(self.pack(batch, prev), rows, self._seq)
        launched = Launched(step, sample_rows, spans)
        for r in range(1, self.mapping.world_size):
            comm.isend_object(step, r, launched.sent)
        launched.logits = self._forward(step, prev, launched.sent)
        return launched

    @torch.inference_mode()
    def finish(self, launched: Launched) -> ModelOutput:
        """Rank 0: the logits of a launched micro-batch (waits for the last stage's)."""
        num_rows = len(launched.step.logit_rows)
        logits = launched.logits
        self._unconfirmed.append(launched.sent)
        if logits is None and num_rows:
            logits = comm.recv_logits((num_rows, self.vocab_size))
        if logits is not None:
            # the last stage ran this micro-batch, so every rank has taken it and every earlier one,
            # and stage 1 this rank's output: these waits return at once
            self._wait_sends()
        else:  # no logits to wait for (only prompt chunks that sample nothing): confirmed by a later one
            logits = torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        n = len(launched.sample_rows)
        prompt_logits = {}
        for i, _, count, targets, first in launched.spans:
            prompt_logits[i] = (logits[n : n + count], targets, first)
            n += count
        return ModelOutput(logits[: len(launched.sample_rows)], launched.sample_rows, prompt_logits)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, prev: PendingTokens | None = None) -> ModelOutput:
        """One micro-batch start to end. Rank 0: launch + finish. Another rank (only where every rank
        runs the same batch, e.g. the profiling pass) runs its part of rank 0's step."""
        if self.is_driver:
            return self.finish(self.launch(batch, prev))
        self.follow()
        return ModelOutput(torch.empty(0, self.vocab_size), [], {})

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
        """Rank 0 (every launched micro-batch finished): tell every other rank to leave its follow loop."""
        self._wait_sends()
        sent = comm.Sent()
        for r in range(1, self.mapping.world_size):
            comm.isend_object(None, r, sent)
        sent.wait()

    # -- every other rank ---------------------------------------------------------------------------
    @torch.inference_mode()
    def follow(self) -> bool:
        """Take rank 0's next step and run this rank's part of it; False when rank 0 stops."""
        step = comm.recv_object(0)
        if step is None:
            while self._sending:
                self._sending.popleft().wait()
            return False
        self._seq += 1
        if step.seq != self._seq:
            raise RuntimeError(f"rank {self.mapping.rank}: got micro-batch {step.seq}, expected {self._seq}")
        sent = comm.Sent()
        self._forward(step, None, sent)
        if len(sent):
            self._sending.append(sent)
            while len(self._sending) > _MAX_PENDING_SENDS:  # back-pressure only: the receiver takes them in order
                self._sending.popleft().wait()
        return True

    # -- every rank ------------------------------------------------------------------------------------
    def _forward(self, step: DistStep, prev: PendingTokens | None, sent: comm.Sent) -> torch.Tensor | None:
        """This rank's part of ``step``; sends go into ``sent``. Returns the logits where they are
        computed and stay (the last stage when it is rank 0's), else None."""
        m = self.mapping
        ids, pos, meta = self.to_device(step.plan, prev)
        if step.plan.pending and m.is_first_pp_rank() and m.tp_size > 1:
            comm.broadcast_tensor(ids, group="tp")  # rank 0 filled the previous step's tokens on its device
        hidden_in = None
        if not m.is_first_pp_rank():
            hidden_in = comm.recv_prev_stage((ids.shape[0], self.hidden_size), self.dtype)
        hidden = self.model(ids, pos, meta, hidden_in) if m.pp_size > 1 else self.model(ids, pos, meta)
        num_rows = len(step.logit_rows)
        if not m.is_last_pp_rank():
            comm.isend_next_stage(hidden, sent)
            return None
        if not num_rows:
            logits = torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        else:
            idx = torch.tensor(step.logit_rows, dtype=torch.int64).to(self.device, non_blocking=True)
            logits = self.model.compute_logits(hidden.index_select(0, idx)).float()
        if m.pp_size > 1:
            if m.rank == self.last_stage_rank and num_rows:
                comm.isend_logits(logits, sent)
            return None
        return logits
