"""Pipeline micro-batch tests: a scripted engine run (arrivals and aborts at given steps, invariants
checked after every step), in one process or split across spawned ranks (gloo).

``run_script`` steps a PyExecutor on this thread; ``run_split_script`` runs it on rank 0 of an engine
split tp x pp (the other ranks follow), with EngineConfig overrides (num_micro_batches, overlap).
"""

from __future__ import annotations

import dataclasses
import traceback

from tests.parallel.harness import spawn_ranks


def run_script(engine, prompts, params, arrivals=None, aborts=None, max_steps: int = 10_000) -> dict:
    """Prompt i is enqueued at step arrivals[i]; aborts[step] lists the prompt indices aborted before that
    step. Returns the token ids and finish reason of each prompt, and what the engine saw: the most
    micro-batches in flight, preemptions, KV blocks still used once the engine is idle, aborts that hit a
    request in a micro-batch in flight."""
    from rtllm.runtime.py_executor import NewRequest

    arrivals = arrivals or [0] * len(prompts)
    aborts = aborts or {}
    plist = params if isinstance(params, list) else [params] * len(prompts)
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    reasons: dict[str, str | None] = {}
    step = in_flight = 0
    while len(reasons) < len(prompts):
        for i, a in enumerate(arrivals):
            if a == step:
                engine.enqueue(NewRequest(str(i), prompts[i], plist[i], seed=plist[i].seed))
        for i in aborts.get(step, []):
            in_flight += any(r.request_id == str(i) for mb in engine._pipeline for r in mb.batch.requests)
            engine.abort(str(i))
        for u in engine._drain_inbox(block=False) + _step_checked(engine):
            outs[u.request_id] += u.new_token_ids
            if u.finished:
                assert u.request_id not in reasons, f"request {u.request_id} finished twice"
                reasons[u.request_id] = u.finish_reason
        step += 1
        assert step < max_steps, "engine did not finish"
    while engine.has_work():  # micro-batches launched for requests that finished meanwhile: nothing to emit
        assert _step_checked(engine) == []
        step += 1
        assert step < max_steps, "engine did not drain"
    return {"tokens": [outs[str(i)] for i in range(len(prompts))],
            "reasons": [reasons[str(i)] for i in range(len(prompts))],
            "max_micro_batches": engine.max_micro_batches_seen, "num_micro_batches": engine.num_micro_batches,
            "preemptions": engine.scheduler.num_preemptions, "used_blocks": engine.kv.stats().used_blocks,
            "steps": step, "aborted_in_flight": in_flight}


def _step_checked(engine):
    updates = engine.step()
    seen: set[str] = set()
    for mb in engine._pipeline:  # a request is in at most one micro-batch in flight
        ids = {r.request_id for r in mb.batch.requests}
        assert not ids & seen, f"requests {sorted(ids & seen)} in two micro-batches in flight"
        seen |= ids
    assert len(engine._pipeline) <= engine.num_micro_batches
    return updates


def _rank_main(rank, tp, pp, path, engine_kwargs, overrides, prompts, arrivals, aborts, params, port,
               results) -> None:
    import torch

    from rtllm.parallel import comm
    from rtllm.parallel.mapping import Mapping
    from rtllm.runtime.py_executor import PyExecutor
    from tests.tiny import engine_config

    try:
        torch.set_num_threads(1)
        mapping = Mapping(tp * pp, tp, pp, rank=rank)
        comm.init_distributed(mapping, f"tcp://127.0.0.1:{port}")
        engine = PyExecutor(dataclasses.replace(engine_config(path, **engine_kwargs), mapping=mapping, **overrides))
        if rank == 0:
            out = run_script(engine, prompts, params, arrivals, aborts)
            engine.stop_followers()
        else:
            engine.follow_loop()
            out = None
        results.put((rank, "ok", out))
        comm.destroy_distributed()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_split_script(path: str, tp: int, pp: int, prompts, params, arrivals=None, aborts=None,
                     overrides: dict | None = None, timeout: float = 120.0, **engine_kwargs) -> dict:
    """``run_script`` on rank 0 of the engine split tp x pp (spawned ranks, gloo)."""
    got = spawn_ranks(_rank_main, tp * pp, (tp, pp, path, engine_kwargs, overrides or {}, prompts, arrivals,
                                            aborts, params), timeout)
    return got[0]
