"""GenerationExecutor: the interface between the user API and an engine loop.

``GenerationExecutor.create(...)`` picks the implementation: in-process (a background thread
runs the PyExecutor loop) or multi-process (a worker process runs it in its main thread).

Everything that does not depend on where the engine runs lives here, once: admission checks
(a RequestValidator built from the engine's limits), fan-out of one client request into n
engine sequences, routing engine updates to their GenerationResult (incremental
detokenization and stop strings happen in the client's process), aborts, and failing every
pending result when the engine dies. Subclasses only move NewRequests and aborts to the
engine (``_send_new`` / ``_send_abort``) and call ``_on_updates`` / ``_fail_all`` with what
comes back.

Invariants: a sequence id ("<request_id>:<index>") is in ``_results`` from submit until its
final update, its failure, or shutdown; once ``_dead`` is set, submit raises EngineDeadError.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

from rtllm import logits_processors
from rtllm.config import EngineConfig
from rtllm.errors import EngineDeadError, RequestFailedError
from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import GenerationResult, wake_all
from rtllm.runtime.kv_cache_manager import KVCacheStats
from rtllm.runtime.py_executor import NewRequest
from rtllm.runtime.scheduler import RequestUpdate
from rtllm.runtime.validation import RequestValidator
from rtllm.tokenizer.detokenizer import IncrementalDetokenizer


class GenerationExecutor(ABC):
    #: what the engine reports about itself (PyExecutor.info()): model, device, dtype, vocab_size,
    #: max_seq_len, kv_capacity_tokens, num_kv_blocks, tokens_per_block, eos_token_ids, ...
    engine_info: dict[str, Any]
    #: whether requests cross a process boundary to reach the engine (they are pickled)
    remote_engine: bool = False

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._results: dict[str, tuple[GenerationResult, int]] = {}  # engine seq id -> (result, index)
        self._lock = threading.Lock()
        self._dead: BaseException | None = None
        self._closed = False
        self._validator: RequestValidator | None = None

    # -- what a subclass provides -----------------------------------------------------------
    @abstractmethod
    def _send_new(self, news: list[NewRequest]) -> None:
        """Hand new sequences to the engine, in order. May raise EngineDeadError."""

    @abstractmethod
    def _send_abort(self, seq_id: str) -> None:
        """Ask the engine to stop one sequence (a no-op for one it no longer holds)."""

    @abstractmethod
    def stats(self) -> KVCacheStats:
        """The KV cache's block usage and prefix hit counts (as of the latest engine step)."""

    @abstractmethod
    def num_requests(self) -> tuple[int, int]:
        """(running, waiting) sequences in the engine's scheduler (as of the latest engine step)."""

    def peak_memory_bytes(self) -> int:
        """The engine's peak device memory (bytes, as of the latest engine step; 0 on the CPU)."""
        return 0

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine loop; pending requests fail. Idempotent."""

    @property
    def error(self) -> BaseException | None:
        """Why the engine died (None while it runs or after a clean shutdown)."""
        return self._dead

    @property
    def is_alive(self) -> bool:
        return self._dead is None and not self._closed

    def _set_engine_info(self, info: dict[str, Any]) -> None:
        self.engine_info = dict(info)
        self._validator = RequestValidator.from_info(info)

    # -- client side --------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError for a request the engine could never run."""
        assert self._validator is not None, "the executor has no engine info yet"
        self._validator.validate(request.prompt_token_ids, request.sampling_params)
        logits_processors.validate(request.sampling_params.logits_processors, picklable=self.remote_engine)

    def _make_detok(self, request: GenerationRequest):
        p = request.sampling_params
        return lambda: IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens, p.stop_strings,
                                              p.include_stop_str_in_output)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        if self._closed:
            raise EngineDeadError("the engine is not running: the executor was shut down")

    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Queue a request. Invalid requests raise InvalidRequestError here, before queueing; a dead
        engine raises EngineDeadError."""
        self._check_alive()
        p = request.sampling_params
        self.validate(request)
        result = GenerationResult(request, self._make_detok(request), self.abort)
        seq_ids = [f"{request.request_id}:{i}" for i in range(p.n)]
        with self._lock:
            self._check_alive()  # under the lock: _fail_all, which runs after _dead is set, sees it
            for i, sid in enumerate(seq_ids):
                self._results[sid] = (result, i)
        news = [NewRequest(sid, list(request.prompt_token_ids), p, None if p.seed is None else p.seed + i,
                           wait_for=seq_ids[0] if i else None) for i, sid in enumerate(seq_ids)]
        try:
            self._send_new(news)
        except BaseException:
            with self._lock:
                for sid in seq_ids:
                    self._results.pop(sid, None)
            raise
        return result

    def abort(self, request_id: int) -> None:
        """Stop a request; its result finishes with finish_reason "abort" and its KV blocks are freed."""
        with self._lock:
            sids = [sid for sid, (r, _) in self._results.items() if r.request_id == request_id]
        for sid in sids:
            self._send_abort(sid)

    # -- engine side ----------------------------------------------------------------------------
    def _on_updates(self, updates: list[RequestUpdate]) -> None:
        """Apply one step's updates (called on one thread at a time, in engine order); asyncio
        consumers are woken once per step, after all of it is applied."""
        wake: list = []
        try:
            for u in updates:
                with self._lock:
                    entry = self._results.get(u.request_id)
                if entry is None:
                    continue
                res, index = entry
                if u.error is not None:  # finish_reason "error": this request alone failed
                    res.fail(RequestFailedError(u.error) if u.finish_reason == "error" else EngineDeadError(u.error))
                elif res.apply(index, u, wake):
                    self._send_abort(u.request_id)  # a stop string ended it: free its blocks
                if u.finished or u.error is not None or res._seqs[index].out.finished:
                    with self._lock:
                        self._results.pop(u.request_id, None)
        finally:
            wake_all(wake)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every pending result with ``error``. Set ``_dead`` or ``_closed`` first: a submit
        racing with this then either registers before (and is failed here) or raises."""
        with self._lock:
            pending = list(self._results.values())
            self._results.clear()
        for res, _ in pending:
            res.fail(error)

    def __enter__(self) -> GenerationExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @staticmethod
    def create(engine_config: EngineConfig, tokenizer, multi_process: bool = True) -> GenerationExecutor:
        """The multi-process executor runs the engine loop in a worker process's main thread (torch is
        measurably slower on a non-main thread); the in-process one runs it on a background thread.
        Under an external launcher (torchrun) with the engine split across its ranks, a rank other than
        0 serves rank 0's engine here and then exits the process (rtllm.executor.launcher)."""
        from rtllm.executor.launcher import follow_launched, launch_for

        launch = launch_for(engine_config)
        if launch is not None and launch.rank != 0:  # a torchrun rank other than 0: serve rank 0, then exit
            follow_launched(engine_config, launch)
        if multi_process:
            from rtllm.executor.multiprocess import MultiProcessExecutor

            return MultiProcessExecutor(engine_config, tokenizer)
        from rtllm.executor.inprocess import InProcessExecutor

        return InProcessExecutor(engine_config, tokenizer)
