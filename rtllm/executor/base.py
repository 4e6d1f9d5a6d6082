"""GenerationExecutor: the interface between the user API and an engine loop.

``GenerationExecutor.create(...)`` picks the implementation: in-process (a worker thread runs
the PyExecutor loop) today; the multi-process proxy/worker split plugs in behind the same
interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from rtllm.config import EngineConfig
from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import GenerationResult


class GenerationExecutor(ABC):
    @abstractmethod
    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Queue a request. Invalid requests raise InvalidRequestError here, before queueing."""

    @abstractmethod
    def abort(self, request_id: int) -> None:
        """Stop a request; its result finishes with finish_reason "abort" and its KV blocks are freed."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine loop; pending requests fail. Idempotent."""

    def __enter__(self) -> GenerationExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @staticmethod
    def create(engine_config: EngineConfig, tokenizer, multi_process: bool = False) -> GenerationExecutor:
        if multi_process:
            raise NotImplementedError("the multi-process executor is not built yet; use multi_process=False")
        from rtllm.executor.inprocess import InProcessExecutor

        return InProcessExecutor(engine_config, tokenizer)
