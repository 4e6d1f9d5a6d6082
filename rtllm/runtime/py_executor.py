"""PyExecutor: the step loop. Owns the scheduler, KV cache manager, model runner and sampler.

Thread model: ``enqueue`` and ``abort`` may be called from any thread; everything else runs on
the loop's thread. Each iteration takes new requests and aborts, schedules, runs the model,
samples, and emits RequestUpdates through the ``emit`` callback.

Pipeline parallel (pp_size > 1) keeps up to ``num_micro_batches`` micro-batches in flight (default
pp_size, EngineConfig.num_micro_batches): each iteration schedules one from the requests that are
in no launched micro-batch, launches it (stage 0 runs it on rank 0, later stages follow), and, when
the pipeline is full or nothing new could start, finishes the oldest: its logits come back from the
last stage, rank 0 samples them, and its requests can be scheduled again. See ``_step_pipelined``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from rtllm import logits_processors
from rtllm.config import EngineConfig
from rtllm.models.loader import LoadedModel, load_model
from rtllm.plugins import load_plugins
from rtllm.runtime.engine_info import engine_info
from rtllm.runtime.kernel_tuning import use_engine_tuning
from rtllm.runtime.kv_cache_manager import KVCacheManager
from rtllm.runtime.model_runner import ModelRunner, kv_bytes_per_token, kv_cache_dtype
from rtllm.runtime.request import Request, RequestStatus
from rtllm.runtime.sampler import Sampler, SamplingRow, make_generator
from rtllm.runtime.scheduler import RequestUpdate, ScheduledBatch, Scheduler
from rtllm.runtime.step_result import LaunchedStep, apply_tokens, prompt_logprobs, track_tokens
from rtllm.runtime.validation import RequestValidator
from rtllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 8192


@dataclass
class _MicroBatch:
    """Pipeline parallel: a micro-batch launched on the stages (committed to the scheduler), whose
    logits are not back yet. Its requests are busy: not scheduled again, not preempted."""

    batch: ScheduledBatch
    handle: Any  # rtllm.runtime.distributed.Launched
    reqs: list[Request]  # requests that sample, in the order of their tokens
    rows: list[SamplingRow]  # made before commit (their token lists without this step's placeholder)


@dataclass
class NewRequest:
    """What the executor hands the runtime: one sequence to generate."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int | None = None  # per-sequence seed (params.seed + sample index for n > 1)
    wait_for: str | None = None  # sibling whose prompt blocks to reuse (n > 1)


class PyExecutor:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        load_plugins()  # architectures, kernels and logits processors of user packages (rtllm.plugins)
        sc, kc = config.scheduler_config, config.kv_cache_config
        # this process's rank when the model is split (tensor / pipeline parallel): rtllm.parallel.Mapping
        self.mapping = config.mapping
        split = self.mapping is not None and self.mapping.world_size > 1
        self.loaded = loaded or load_model(config.model, config.dtype, self.device,
                                           max_positions=sc.max_seq_len or DEFAULT_MAX_SEQ_LEN,
                                           quant_config=config.quant_config, mapping=self.mapping if split else None)
        self.model_config = self.loaded.config
        use_engine_tuning(getattr(self.loaded, "kernel_tuning", None),
                          torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                          str(config.model))
        if sc.max_seq_len is None:
            sc = replace(sc, max_seq_len=min(self.model_config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN))
            config.scheduler_config = sc
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self.kv_dtype = kv_cache_dtype(self.loaded.dtype, config.quant_config,
                                       getattr(self.loaded, "kv_cache_quant_algo", None))
        if split:  # rank 0 broadcasts each step; every rank runs its slice of the model
            from rtllm.runtime.distributed import DistributedModelRunner

            self.runner = DistributedModelRunner(self.loaded.model, self.device, self.loaded.dtype,
                                                 kc.tokens_per_block, self.kv_dtype, self.mapping)
        else:
            self.runner = ModelRunner(self.loaded.model, self.device, self.loaded.dtype, kc.tokens_per_block,
                                      self.kv_dtype)
        self.startup: dict[str, float] = {"weights_s": self.loaded.load_seconds}
        t0 = time.perf_counter()
        num_blocks = self._num_kv_blocks()
        if split:  # the same block count on every rank: what fits on all of them
            from rtllm.parallel import comm

            num_blocks = comm.all_reduce_min(num_blocks)
        self.startup["profile_s"] = time.perf_counter() - t0
        self.runner.allocate_kv_cache(num_blocks)
        gc = config.cuda_graph_config
        # no CUDA graphs with collectives inside yet (world_size > 1)
        sizes = gc.capture_sizes(sc.max_batch_size) if (gc is not None and self.device.type == "cuda"
                                                         and not split) else []
        self.startup["graph_capture_s"] = self.runner.capture_cuda_graphs(sizes, sc.max_seq_len)
        self.kv = KVCacheManager(num_blocks, kc.tokens_per_block, kc.enable_block_reuse)
        self.scheduler = Scheduler(sc, self.kv)
        self.validator = RequestValidator(self.model_config.vocab_size, sc.max_seq_len, self.kv.capacity_tokens)
        self.sampler = Sampler()
        self._inbox: queue.Queue = queue.Queue()
        self.num_steps = 0
        # overlap scheduling pays off when a device runs the step asynchronously (CUDA)
        self.overlap = (self.device.type == "cuda") if config.overlap is None else config.overlap
        self._inflight: LaunchedStep | None = None
        # pipeline parallel: micro-batches in flight between the stages (1: one step at a time)
        pp = self.mapping.pp_size if split else 1
        self.num_micro_batches = (config.num_micro_batches or pp) if pp > 1 else 1
        self._pipeline: deque[_MicroBatch] = deque()
        self.max_micro_batches_seen = 0  # the most micro-batches in flight at once so far (stats, tests)

    # -- ranks other than 0 (the model split across ranks) -----------------------------------------
    def follow_loop(self) -> None:
        """A rank other than 0: run each step rank 0 broadcasts until it stops the followers."""
        while self.runner.follow():
            pass

    def stop_followers(self) -> None:
        """Rank 0, at shutdown: finish the micro-batches still in flight (their tokens are dropped),
        then release the other ranks from their follow loops."""
        if self.mapping is not None and self.mapping.world_size > 1:
            while self._pipeline:
                self.runner.finish(self._pipeline.popleft().handle)
            self.runner.stop_followers()

    def set_eos_token_ids(self, ids: frozenset[int]) -> None:
        """The tokenizer may know more end tokens than config.json (e.g. a chat end token)."""
        self.eos_token_ids = frozenset(ids) | frozenset(self.model_config.eos_token_ids)

    # -- sizing ---------------------------------------------------------------------------
    def _num_kv_blocks(self) -> int:
        kc, sc = self.config.kv_cache_config, self.config.scheduler_config
        per_token = kv_bytes_per_token(self.loaded.model, self.kv_dtype)
        if kc.max_tokens is not None:
            tokens = kc.max_tokens
        elif self.device.type == "cuda":
            peak = self.runner.profile_peak_bytes(sc.max_num_tokens, sc.max_batch_size)
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int((free - peak) * kc.free_gpu_memory_fraction)
            tokens = max(budget, 0) // per_token
            logger.info("GPU memory: %.2f GiB total, weights %.2f GiB, activation peak %.2f GiB, "
                        "KV budget %.2f GiB = %d tokens", total / 2**30, self.loaded.weight_bytes / 2**30,
                        peak / 2**30, budget / 2**30, tokens)
        else:
            want = sc.max_batch_size * sc.max_seq_len
            tokens = min(want, self.config.cpu_kv_cache_bytes // per_token)
        return max(tokens // kc.tokens_per_block, 1) + 1  # + the null block

    # -- intake (any thread) --------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reject a request that can never run, with a message naming the problem."""
        self.validator.validate(prompt_token_ids, params)

    def peak_memory_bytes(self) -> int:
        """Peak device memory the caching allocator has held so far (weights, KV pool, activations,
        CUDA-graph pools); 0 on the CPU. A host-side counter: no device sync."""
        return int(torch.cuda.max_memory_reserved(self.device)) if self.device.type == "cuda" else 0

    def info(self) -> dict[str, Any]:
        """What a client needs to know about this engine without holding it: rtllm.runtime.engine_info."""
        return engine_info(self)

    def enqueue(self, new: NewRequest) -> None:
        self._inbox.put(("add", new))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def wake(self) -> None:
        self._inbox.put(("wake", None))

    # -- loop thread ------------------------------------------------------------------------
    def _drain_inbox(self, block: bool) -> list[RequestUpdate]:
        updates: list[RequestUpdate] = []
        try:
            item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return updates
        while True:
            kind, payload = item
            if kind == "add":
                failed = self._add(payload)
                if failed is not None:
                    updates.append(failed)
            elif kind == "abort":
                req = self.scheduler.finish_request(payload, RequestStatus.FINISHED_ABORTED)
                if req is not None:
                    updates.append(RequestUpdate(payload, [], True, "abort"))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return updates

    def _add(self, new: NewRequest) -> RequestUpdate | None:
        """Admit a new sequence; an update that fails it when its logits processors do not resolve here."""
        sc = self.config.scheduler_config
        params = new.sampling_params
        try:
            procs = logits_processors.resolve_all(params.logits_processors)
        except Exception as e:
            return RequestUpdate(new.request_id, [], True, "error", error=f"{type(e).__name__}: {e}")
        n = len(new.prompt_token_ids)
        room = min(sc.max_seq_len, self.kv.capacity_tokens) - n
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        wait_for = self.scheduler.requests.get(new.wait_for) if new.wait_for else None
        req = Request(new.request_id, new.prompt_token_ids, params, self.eos_token_ids, max(max_tokens, 1),
                      generator=make_generator(new.seed, self.device), wait_for=wait_for, logits_processors=procs)
        self.scheduler.add_request(req)
        return None

    # -- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestUpdate]:
        """One iteration. With overlap, step N+1 is scheduled and launched before step N's tokens
        are read back, so the CPU work of both runs while the GPU computes; otherwise each step
        completes before the next is scheduled. Both give the same tokens."""
        if self.num_micro_batches > 1:
            return self._step_pipelined()
        batch = self.scheduler.schedule()
        prev = self._inflight
        self._inflight = None
        if not batch.requests:
            return self._complete(prev) if prev is not None else []
        if self.overlap and not self._needs_sync(batch):
            launched = self._launch(batch, prev, to_cpu=False)
            updates = self._complete(prev) if prev is not None else []
            self._inflight = launched
        else:
            updates = self._complete(prev) if prev is not None else []
            batch = self._drop_finished(batch)  # the completion may have finished some of them
            if batch.requests:
                updates.extend(self._complete(self._launch(batch, None, to_cpu=True)))
        self.num_steps += 1
        return updates

    @staticmethod
    def _needs_sync(batch: ScheduledBatch) -> bool:
        """Penalties and logits processors need every previous token on the host; logprobs are read back
        at once anyway."""
        return any(r.sampling_params.needs_penalties or r.sampling_params.logprobs is not None
                   or r.sampling_params.prompt_logprobs is not None or r.logits_processors for r in batch.requests)

    @staticmethod
    def _drop_finished(batch: ScheduledBatch) -> ScheduledBatch:
        keep = [i for i, r in enumerate(batch.requests) if not r.is_finished]
        if len(keep) == len(batch.requests):
            return batch
        return ScheduledBatch([batch.requests[i] for i in keep], [batch.num_new_tokens[i] for i in keep],
                              batch.preempted)

    # -- pipeline parallel: micro-batches in flight ------------------------------------------------
    def _step_pipelined(self) -> list[RequestUpdate]:
        """One iteration with up to num_micro_batches micro-batches in flight between the stages.

        1. Unless the pipeline is full, schedule a micro-batch from the requests in no launched one
           (at most ceil(active / num_micro_batches) requests, so they spread over the micro-batches)
           and launch it: rank 0 sends the step to every rank and runs stage 0, and the step is
           committed (a placeholder for each token it will sample), as under overlap scheduling.
        2. When the pipeline is full or nothing could be launched, finish the oldest micro-batch:
           wait for its logits from the last stage and sample them. Without overlap its tokens are
           applied at once; with overlap they stay on the device until the next iteration has
           launched its micro-batch (which may read them, filled on rank 0's device), as in ``step``.
        A request is in at most one launched micro-batch: its next token is scheduled only after
        the previous one is sampled. Every rank runs the micro-batches in launch order, so freed or
        prefix-shared KV blocks are never read or overwritten before an earlier micro-batch is done
        with them on that rank."""
        updates: list[RequestUpdate] = []
        prev, self._inflight = self._inflight, None  # sampled on the device, not applied yet (overlap)
        launched = False
        if len(self._pipeline) < self.num_micro_batches:
            busy = {r for mb in self._pipeline for r in mb.batch.requests}
            s = self.scheduler
            cap = max(1, math.ceil((len(s.running) + len(s.waiting)) / self.num_micro_batches))
            batch = s.schedule(busy=busy, max_requests=cap)
            if batch.requests:
                if self.overlap and not self._needs_sync(batch):
                    self._pipeline.append(self._launch_micro(batch, prev))
                else:
                    if prev is not None:
                        updates.extend(self._complete(prev))
                        prev = None
                    batch = self._drop_finished(batch)
                    if batch.requests:
                        self._pipeline.append(self._launch_micro(batch, None))
                launched = bool(batch.requests)
                self.max_micro_batches_seen = max(self.max_micro_batches_seen, len(self._pipeline))
        if prev is not None:
            updates.extend(self._complete(prev))
        if self._pipeline and (len(self._pipeline) >= self.num_micro_batches or not launched):
            done = self._finish_micro(self._pipeline.popleft(), to_cpu=not self.overlap)
            if self.overlap:
                self._inflight = done  # applied next iteration, after its micro-batch is launched
            else:
                updates.extend(self._complete(done))
        self.num_steps += 1
        return updates

    def _launch_micro(self, batch: ScheduledBatch, prev: LaunchedStep | None) -> _MicroBatch:
        handle = self.runner.launch(batch, prev.pending if prev is not None else None)
        rows = self._sampling_rows(batch, handle.sample_rows)
        return _MicroBatch(batch, handle, self.scheduler.commit(batch), rows)

    def _finish_micro(self, mb: _MicroBatch, to_cpu: bool) -> LaunchedStep:
        out = self.runner.finish(mb.handle)
        return self._sampled(mb.batch, out, mb.rows, mb.reqs, to_cpu)

    # -- one step -------------------------------------------------------------------------------------
    @staticmethod
    def _sampling_rows(batch: ScheduledBatch, sample_rows: list[int]) -> list[SamplingRow]:
        rows = []
        for i in sample_rows:
            r = batch.requests[i]
            rows.append(SamplingRow(r.sampling_params, r.generator, r.prompt_token_ids, r.output_token_ids,
                                    r.eos_token_ids, r.logits_processors or None))
        return rows

    def _launch(self, batch: ScheduledBatch, prev: LaunchedStep | None, to_cpu: bool) -> LaunchedStep:
        """Run the model and the sampler for ``batch`` (asynchronously on a GPU when to_cpu is
        False) and commit the step to the scheduler."""
        out = self.runner.execute(batch, prev.pending if prev is not None else None)
        rows = self._sampling_rows(batch, out.sample_rows)
        sampled = self.sampler.sample(out.sample_logits, rows, to_cpu=to_cpu) if rows else None
        prompt_lp = prompt_logprobs(batch, out)
        reqs = self.scheduler.commit(batch)
        return track_tokens(LaunchedStep(batch, reqs, sampled, prompt_lp, rows), out)

    def _sampled(self, batch: ScheduledBatch, out, rows: list[SamplingRow], reqs: list[Request],
                 to_cpu: bool) -> LaunchedStep:
        """A committed micro-batch's logits sampled (the tokens' copy to the host started)."""
        sampled = self.sampler.sample(out.sample_logits, rows, to_cpu=to_cpu) if rows else None
        return track_tokens(LaunchedStep(batch, reqs, sampled, prompt_logprobs(batch, out), rows), out)

    def _complete(self, launched: LaunchedStep) -> list[RequestUpdate]:
        return apply_tokens(launched, self.scheduler)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None or bool(self._pipeline)

    def run_loop(self, emit: Callable[[list[RequestUpdate]], None], stop: threading.Event,
                 intake: Callable[[float], None] | None = None) -> None:
        """Run steps until ``stop`` is set. An exception inside a step fails every request and re-raises.

        ``intake(timeout)``, when given, is called once per iteration before the inbox is drained: it
        moves requests from an outside transport into the inbox (``enqueue`` / ``abort``), waiting up
        to ``timeout`` seconds for the first one (0 while there is work to step).
        """
        while not stop.is_set():
            idle = not self.has_work()
            if intake is not None:
                intake(0.1 if idle else 0.0)
                updates = self._drain_inbox(block=False)
            else:
                updates = self._drain_inbox(block=idle)
            if self.has_work():
                t0 = time.perf_counter()
                try:
                    updates.extend(self.step())
                except Exception as e:
                    logger.exception("engine step failed")
                    msg = f"engine step failed: {type(e).__name__}: {e}"
                    for rid in list(self.scheduler.requests):
                        self.scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED)
                        updates.append(RequestUpdate(rid, [], True, "abort", error=msg))
                    emit(updates)
                    raise
                self.last_step_seconds = time.perf_counter() - t0
            if updates:
                emit(updates)
