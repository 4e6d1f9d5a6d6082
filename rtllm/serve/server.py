"""``run_server``: serve the app with uvicorn; graceful shutdown on SIGTERM / SIGINT.

On the first signal the server stops accepting connections, answers new requests on open
connections with 503, and lets in-flight requests run for ``shutdown_timeout`` seconds; then
it aborts what is left (streams get an error event and ``[DONE]``, others a 503), stops the
engine worker and exits 0. A second SIGINT forces the exit. When the engine dies (and
``on_death="exit"``) or fails to start, the server shuts down the same way and exits 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import uvicorn

from rtllm.serve.app import ServerConfig, create_app
from rtllm.serve.engine import EngineManager

logger = logging.getLogger("rtllm.serve")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app_state, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.rt = app_state
        self.shutdown_timeout = shutdown_timeout
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self.loop is not None:
            self.loop.call_soon_threadsafe(self.begin_drain, f"signal {signal.Signals(sig).name}")

    def begin_drain(self, why: str) -> None:
        state = self.rt
        if state.draining:
            return
        state.draining = True
        self.should_exit = True
        n = len(state.inflight)
        logger.info("shutting down (%s): %d requests in flight get %.0f s to finish", why, n, self.shutdown_timeout)
        self.loop.call_later(self.shutdown_timeout, self._abort_rest)

    def _abort_rest(self) -> None:
        n = self.rt.abort_all("the server is shutting down")
        if n:
            logger.warning("aborted %d requests still running after the %.0f s shutdown timeout", n,
                           self.shutdown_timeout)


def run_server(factory: Callable[[], object], config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
               on_engine_death: str = "exit", uvicorn_log_level: str = "info") -> int:
    """Serve until a signal or a fatal engine error; returns the process exit code."""
    engine = EngineManager(factory, on_death=on_engine_death)
    app = create_app(engine, config)
    ucfg = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=int(config.shutdown_timeout) + 5, log_level=uvicorn_log_level)
    server = _Server(ucfg, app.state.rt, config.shutdown_timeout)
    code = {"exit": 0}

    def request_exit(exit_code: int) -> None:
        code["exit"] = max(code["exit"], exit_code)
        server.begin_drain("the engine is not running")

    app.state.request_exit = request_exit
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place
    # that re-raise is a no-op, so a graceful SIGTERM ends in exit code 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started and code["exit"] == 0:
        return 1  # could not bind the port (uvicorn logged why)
    return code["exit"]
