"""Where a decode step of the default model goes on the CPU (in-process PyExecutor, no executor
process, the engine loop's own thread).

    python scripts/cpu_step_profile.py --dtype bfloat16 --rows 16 --isl 64 --steps 20 [--quant w4a16]

Admits ``--rows`` requests of ``--isl`` prompt tokens, runs steps until every one is decoding,
times ``--steps`` pure decode steps (median, and tok/s), then profiles as many more with
torch.profiler and prints the top ops by self CPU time (``--python``: cProfile's functions instead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rtllm import SamplingParams
from rtllm.config import EngineConfig, KvCacheConfig, SchedulerConfig
from rtllm.llmapi.default_model import default_model_path
from rtllm.quantization.config import QuantConfig
from rtllm.runtime.py_executor import NewRequest, PyExecutor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default=None)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--isl", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--python", action="store_true", help="cProfile the steps (Python functions) instead")
    args = ap.parse_args()
    quant = QuantConfig(args.quant.upper()) if args.quant else None
    cfg = EngineConfig(default_model_path(), dtype=args.dtype, quant_config=quant,
                       kv_cache_config=KvCacheConfig(max_tokens=args.rows * (args.isl + 4 * args.steps + 64)),
                       scheduler_config=SchedulerConfig(max_batch_size=args.rows, max_num_tokens=8192,
                                                        max_seq_len=args.isl + 4 * args.steps + 64))
    engine = PyExecutor(cfg)
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=4 * args.steps + 8, temperature=0, ignore_eos=True)
    for i in range(args.rows):
        ids = torch.randint(100, vocab - 100, (args.isl,), generator=g).tolist()
        engine.enqueue(NewRequest(f"r{i}", ids, params))
    engine._drain_inbox(block=False)  # admit them (run_loop does this each iteration)
    t0, prefill_steps = time.perf_counter(), 0
    while engine.scheduler.waiting:  # prefills
        engine.step()
        prefill_steps += 1
    prefill_s = time.perf_counter() - t0
    for _ in range(3):  # warm decode steps
        engine.step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"# {args.dtype} quant={args.quant} rows={args.rows} threads={torch.get_num_threads()}: decode step "
          f"median {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}) = {args.rows / med:.0f} tok/s; prefill of "
          f"{args.rows} x {args.isl} tokens: {prefill_s * 1e3:.0f} ms in {prefill_steps} steps")
    if args.python:  # where the step's Python time goes (cProfile), instead of the op table
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            for _ in range(args.steps):
                engine.step()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
