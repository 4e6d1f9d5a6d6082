"""Garbage-collector pauses of the engine process, timed through ``gc.callbacks``.

A full (generation 2) collection walks every tracked object; in an engine holding thousands of
requests it can stall the step loop for tens of milliseconds, which shows up as inter-token
latency spikes for every running request. The worker freezes its start-up objects (``gc.freeze``:
the model, the KV pool's bookkeeping) so collections only walk what serving creates, and this
monitor measures what is left.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field


@dataclass
class GcMonitor:
    slow_ms: float = 10.0
    collections: list[int] = field(default_factory=lambda: [0, 0, 0])  # per generation
    total_s: float = 0.0
    max_s: float = 0.0
    slow: int = 0  # collections of at least slow_ms
    _t0: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        if self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        self._t0 = None
        self.collections[info.get("generation", 2)] += 1
        self.total_s += dt
        self.max_s = max(self.max_s, dt)
        if dt * 1e3 >= self.slow_ms:
            self.slow += 1

    def install(self) -> GcMonitor:
        gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> str:
        return (f"gc: {sum(self.collections)} collections (gen0/1/2 {self.collections[0]}/{self.collections[1]}/"
                f"{self.collections[2]}), {self.total_s * 1e3:.1f} ms in total, max {self.max_s * 1e3:.1f} ms, "
                f"{self.slow} of >= {self.slow_ms:g} ms")
