"""Run one engine split across ranks in spawned processes (gloo), stepping rank 0 by hand.

Rank 0 builds a PyExecutor with its Mapping and runs tests.tiny.run_engine (prompts enqueued at given
steps: inflight arrivals, deterministic); the other ranks run ``follow_loop``. The executor's process
management is tested separately through LLM(tensor_parallel_size=...).
"""

from __future__ import annotations

import dataclasses
import queue
import traceback

import torch.multiprocessing as mp

# the engine limits the split tests run with: prompts over 64 tokens are chunked
ENGINE = dict(max_num_tokens=64, max_batch_size=8, kv_tokens=2048, tokens_per_block=8)


def _rank_main(rank, tp, pp, ep, path, engine_kwargs, prompts, arrivals, params, port, results) -> None:
    import torch

    from rtllm.parallel import comm
    from rtllm.parallel.mapping import Mapping
    from rtllm.runtime.py_executor import PyExecutor
    from tests.tiny import engine_config, run_engine

    try:
        torch.set_num_threads(1)
        mapping = Mapping(tp * pp, tp, pp, moe_ep_size=ep, rank=rank)
        comm.init_distributed(mapping, f"tcp://127.0.0.1:{port}")
        engine = PyExecutor(dataclasses.replace(engine_config(path, **engine_kwargs), mapping=mapping))
        if rank == 0:
            out = run_engine(engine, prompts, params, arrivals)
            engine.stop_followers()
            results.put((0, "ok", (out, [tuple(p.shape) for p in engine.loaded.model.parameters()])))
        else:
            engine.follow_loop()
            results.put((rank, "ok", (None, [tuple(p.shape) for p in engine.loaded.model.parameters()])))
        comm.destroy_distributed()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def spawn_ranks(target, world: int, args: tuple, timeout: float = 120.0) -> dict:
    """Run ``target(rank, *args, port, results)`` in ``world`` spawned processes (a fresh tcp port for the
    rendezvous); each puts ``(rank, "ok" | "error", payload)`` on ``results``. Returns the payloads by
    rank; a rank's error or a rank that never answers within ``timeout`` fails the test."""
    from rtllm.parallel.comm import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, *args, port, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        while len(got) < len(procs):
            rank, status, payload = results.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            got[rank] = payload
    except queue.Empty:
        raise AssertionError(f"ranks {sorted(set(range(len(procs))) - set(got))} did not finish") from None
    finally:
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
    return got


def run_split(path: str, tp: int, pp: int, prompts, params, arrivals=None, timeout: float = 120.0,
              ep: int | None = None, **engine_kwargs):
    """Token ids of every prompt from rank 0, and each rank's parameter shapes. ``ep``: the MoE layers'
    expert-parallel size (None: the Mapping default, experts split by moe tensor parallel)."""
    got = spawn_ranks(_rank_main, tp * pp, (tp, pp, ep, path, engine_kwargs, prompts, arrivals, params), timeout)
    return got[0][0], {r: shapes for r, (_, shapes) in got.items()}
