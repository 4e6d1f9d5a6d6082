"""EngineManager: the server's one LLM, its start-up, death and restart.

States: "loading" (the LLM is being built on a worker thread; /health answers 503), "ready",
"dead" (the engine worker died or raised; pending requests were already failed by the
executor), "failed" (start-up raised), "stopped". A watcher task notices a dead engine within
``poll_s`` and, per ``on_death``, either asks the server to exit ("exit", the default: a
process supervisor restarts it) or builds a new LLM in place ("restart", at most
``max_restarts`` times).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

logger = logging.getLogger("rtllm.serve")

ON_DEATH = ("exit", "restart")


class EngineManager:
    def __init__(self, factory: Callable[[], object], on_death: str = "exit", max_restarts: int = 3,
                 poll_s: float = 0.2) -> None:
        if on_death not in ON_DEATH:
            raise ValueError(f"on_death={on_death!r}: must be one of {ON_DEATH}")
        self.factory = factory
        self.on_death = on_death
        self.max_restarts = max_restarts
        self.poll_s = poll_s
        self.llm = None
        self.state = "loading"
        self.error: BaseException | None = None
        self.restarts = 0
        self._watcher: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        if self.state == "ready" and self.llm is not None and not self.llm.executor.is_alive:
            self.state = "dead"
            self.error = self.llm.executor.error
        return self.state == "ready"

    async def start(self) -> None:
        """Build the LLM off the event loop (the server answers /health meanwhile)."""
        self.state = "loading"
        t0 = time.perf_counter()
        try:
            self.llm = await asyncio.to_thread(self.factory)
        except BaseException as e:
            self.state, self.error = "failed", e
            logger.error("engine start-up failed: %s: %s", type(e).__name__, e)
            raise
        self.state, self.error = "ready", None
        logger.info("engine ready in %.1f s", time.perf_counter() - t0)

    def watch(self, on_exit: Callable[[int], None]) -> None:
        """Start the death watcher; ``on_exit(code)`` asks the server to stop."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch(on_exit))

    async def _watch(self, on_exit: Callable[[int], None]) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self.ready or self.state != "dead":  # `ready` moves a dead engine's state to "dead"
                continue
            logger.error("the engine died: %s", self.error)
            if self.on_death == "restart" and self.restarts < self.max_restarts:
                self.restarts += 1
                logger.warning("restarting the engine (restart %d of %d)", self.restarts, self.max_restarts)
                await asyncio.to_thread(self._shutdown_llm)
                try:
                    await self.start()
                    continue
                except BaseException:
                    pass
            on_exit(1)
            return

    def _shutdown_llm(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.shutdown()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        await asyncio.to_thread(self._shutdown_llm)
        self.state = "stopped"
