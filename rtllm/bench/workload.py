"""Synthetic workloads and statistics shared by the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Workload:
    num_requests: int
    isl: int  # input tokens per request
    osl: int  # output tokens per request (EOS ignored, so every request produces exactly osl)
    concurrency: int
    seed: int = 0

    def prompts(self, vocab_size: int, avoid: frozenset[int] = frozenset()) -> list[list[int]]:
        """Random token prompts; distinct first tokens keep the prefix cache out of the measurement."""
        rng = np.random.default_rng(self.seed)
        low = 100 if vocab_size > 1000 else 0
        out = []
        for _ in range(self.num_requests):
            ids = rng.integers(low, vocab_size, self.isl).tolist()
            out.append([t if t not in avoid else low for t in ids])
        return out


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in ps} | {"mean": float("nan")}
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{p}": float(np.percentile(arr, p)) for p in ps}
    out["mean"] = float(arr.mean())
    return out


def run_event_loop(coro):
    """``asyncio.run`` on uvloop when it is installed (as uvicorn does for the server), so offline and
    serving benchmarks drive their clients on the same kind of event loop."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if hasattr(uvloop, "run"):
        return uvloop.run(coro)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(coro)
