"""In-process executor: a background thread runs the PyExecutor step loop.

Engine updates are applied to their GenerationResult right on the loop thread (incremental
detokenization and stop strings are cheap next to a model step); a stop-string hit aborts the
engine-side sequence so its KV blocks are freed at the next step. Useful for debugging and for
tests that inspect the engine (``executor.engine``); the multi-process executor is the default
because torch runs slower on a non-main thread.
"""

from __future__ import annotations

import logging
import threading

from rtllm.config import EngineConfig
from rtllm.errors import EngineDeadError
from rtllm.executor.base import GenerationExecutor
from rtllm.runtime.kv_cache_manager import KVCacheStats
from rtllm.runtime.py_executor import NewRequest, PyExecutor

logger = logging.getLogger(__name__)


class InProcessExecutor(GenerationExecutor):
    def __init__(self, engine_config: EngineConfig, tokenizer, engine: PyExecutor | None = None) -> None:
        super().__init__(tokenizer)
        self.engine = engine or PyExecutor(engine_config)
        if tokenizer is not None:
            self.engine.set_eos_token_ids(tokenizer.eos_token_ids)
        self._set_engine_info(self.engine.info())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rtllm-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            self.engine.run_loop(self._on_updates, self._stop)
        except BaseException as e:  # the loop already failed every request it held
            self._dead = e
            self._fail_all(EngineDeadError(f"engine loop died: {e}"))

    def _send_new(self, news: list[NewRequest]) -> None:
        for new in news:
            self.engine.enqueue(new)

    def _send_abort(self, seq_id: str) -> None:
        self.engine.abort(seq_id)

    def stats(self) -> KVCacheStats:
        return self.engine.kv.stats()

    def num_requests(self) -> tuple[int, int]:
        s = self.engine.scheduler
        return len(s.running), len(s.waiting)

    def peak_memory_bytes(self) -> int:
        return self.engine.peak_memory_bytes()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.engine.wake()
        self._thread.join(timeout=30)
        self._fail_all(EngineDeadError("the executor was shut down"))
