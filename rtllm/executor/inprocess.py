"""In-process executor: a background thread runs the PyExecutor step loop.

Engine updates are applied to their GenerationResult right on the loop thread (incremental
detokenization and stop strings are cheap next to a model step); a stop-string hit aborts the
engine-side sequence so its KV blocks are freed at the next step.
"""

from __future__ import annotations

import logging
import threading

from rtllm.config import EngineConfig
from rtllm.errors import EngineDeadError
from rtllm.executor.base import GenerationExecutor
from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import GenerationResult
from rtllm.runtime.py_executor import NewRequest, PyExecutor
from rtllm.runtime.scheduler import RequestUpdate
from rtllm.tokenizer.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


class InProcessExecutor(GenerationExecutor):
    def __init__(self, engine_config: EngineConfig, tokenizer, engine: PyExecutor | None = None) -> None:
        self.tokenizer = tokenizer
        self.engine = engine or PyExecutor(engine_config)
        if tokenizer is not None:
            self.engine.set_eos_token_ids(tokenizer.eos_token_ids)
        self._results: dict[str, tuple[GenerationResult, int]] = {}  # engine seq id -> (result, index)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rtllm-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            self.engine.run_loop(self._on_updates, self._stop)
        except BaseException as e:  # the loop already failed every request it held
            self._dead = e
            with self._lock:
                pending = list(self._results.values())
                self._results.clear()
            for res, _ in pending:
                res.fail(EngineDeadError(f"engine loop died: {e}"))

    def _on_updates(self, updates: list[RequestUpdate]) -> None:
        for u in updates:
            with self._lock:
                entry = self._results.get(u.request_id)
            if entry is None:
                continue
            res, index = entry
            if u.error is not None:
                res.fail(EngineDeadError(u.error))
            elif res.apply(index, u):
                self.engine.abort(u.request_id)  # a stop string ended it
            if u.finished or u.error is not None or res._seqs[index].out.finished:
                with self._lock:
                    self._results.pop(u.request_id, None)

    def _make_detok(self, request: GenerationRequest):
        p = request.sampling_params
        return lambda: IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens, p.stop_strings,
                                              p.include_stop_str_in_output)

    def submit(self, request: GenerationRequest) -> GenerationResult:
        if self._dead is not None or self._stop.is_set():
            raise EngineDeadError("the engine is not running" + (f": {self._dead}" if self._dead else ""))
        p = request.sampling_params
        self.engine.validate(request.prompt_token_ids, p)
        result = GenerationResult(request, self._make_detok(request), self.abort)
        seq_ids = [f"{request.request_id}:{i}" for i in range(p.n)]
        with self._lock:
            for i, sid in enumerate(seq_ids):
                self._results[sid] = (result, i)
        for i, sid in enumerate(seq_ids):
            seed = None if p.seed is None else p.seed + i
            self.engine.enqueue(NewRequest(sid, list(request.prompt_token_ids), p, seed,
                                           wait_for=seq_ids[0] if i else None))
        return result

    def abort(self, request_id: int) -> None:
        with self._lock:
            sids = [sid for sid, (r, _) in self._results.items() if r.request_id == request_id]
        for sid in sids:
            self.engine.abort(sid)

    def shutdown(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.engine.wake()
        self._thread.join(timeout=30)
        with self._lock:
            pending = list(self._results.values())
            self._results.clear()
        for res, _ in pending:
            res.fail(EngineDeadError("the executor was shut down"))
