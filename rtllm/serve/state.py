"""What the server's routes share: ``ServerConfig`` (the CLI's server options) and ``ServerState``
(the engine, metrics, the in-flight table and the drain flag)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rtllm.executor.result import GenerationResult
from rtllm.serve.engine import EngineManager
from rtllm.serve.metrics import ServerMetrics


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_key: str | None = None
    max_queue: int = 1024  # sequences allowed to wait beyond the engine's max_batch_size
    max_body_bytes: int = 4 * 2**20
    log_prompts: bool = False  # put prompt and completion text in the access log
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    root_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class ServerState:
    """What the routes share: the engine, metrics, the in-flight table and the drain flag."""

    def __init__(self, engine: EngineManager, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.served_model_names[0]
        self.metrics = ServerMetrics(self.model_name, self._engine_snapshot)
        self.inflight: dict[str, list[GenerationResult]] = {}
        self.inflight_seqs = 0
        self.draining = False
        self.created = int(time.time())

    def _engine_snapshot(self) -> dict | None:
        llm = self.engine.llm
        if llm is None or self.engine.state != "ready":
            return None
        ex = llm.executor
        s = ex.stats()
        running, waiting = ex.num_requests()
        return {"num_running": running, "num_waiting": waiting, "kv_used_blocks": s.used_blocks,
                "kv_total_blocks": s.num_blocks, "prefix_queries": s.queried_tokens, "prefix_hits": s.hit_tokens}

    def max_inflight(self) -> int:
        return self.engine.llm.args.max_batch_size + self.config.max_queue

    def abort_all(self, reason: str) -> int:
        n = 0
        for results in list(self.inflight.values()):
            for r in results:
                if not r.finished:
                    r.abort_reason = reason
                    r.abort()
                    n += 1
        return n

