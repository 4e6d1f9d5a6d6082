"""Where a batch-1 step of a MoE model goes, through the engine (in-process executor), on CUDA.

    python scripts/moe_engine_profile.py --model configs/qwen3-30b-a3b.json --out /tmp/prof

Random weights from a bare config. Prints, for each engine variant (--variants: "default" is the code
as it is, with the GEMV-shaped expert launches where few pairs run, i.e. decode; "gemm" runs the
pair-block GEMMs + slot sum there instead, the decode path before them):
- TTFT of single requests one after another (the first right after start-up: one-time costs show);
- a prefill of ISL tokens through ModelRunner.execute: host wall time (synchronized) and the time
  until execute returns (the host's launch work), so host-bound and GPU-bound steps tell apart;
- the batch-1 decode CUDA graph's replay time (the whole step on the GPU, LM head included) and
  the TPOT of a 128-token generation (the graph plus the engine's host work per step);
- per-kernel GPU time of one prefill and of one decode graph replay (torch.profiler), by category,
  with the full tables in --out.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from kernel_profile import kernel_table


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_variant(label: str, args) -> None:
    from torch.profiler import ProfilerActivity, profile

    from rtllm import LLM, SamplingParams
    from rtllm.config import CudaGraphConfig
    from rtllm.kernels import triton_moe
    from rtllm.runtime.request import Request
    from rtllm.runtime.scheduler import ScheduledBatch

    saved = triton_moe.moe_gemm_config
    if label == "gemm":  # the pair-block GEMMs where the GEMV launches run by default (few pairs: decode)
        triton_moe.moe_gemm_config = lambda *a: dict(saved(*a), GEMV=False)
    t0 = time.perf_counter()
    cuda = args.device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    llm = LLM(args.model, dtype="bfloat16" if cuda else "float32", device=args.device, executor_type="inprocess",
              cuda_graph_config=CudaGraphConfig(max_batch_size=args.max_batch_size) if cuda else None,
              max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
              max_seq_len=args.isl + 160)
    print(f"\n=== {label}: engine ready in {time.perf_counter() - t0:.1f} s "
          f"({llm.executor.engine_info.get('startup')})")
    try:
        vocab = llm.tokenizer.vocab_size
        rng = random.Random(0)
        prompt = lambda: [rng.randrange(100, min(vocab, 30000)) for _ in range(args.isl)]  # noqa: E731
        one = SamplingParams(max_tokens=1, temperature=0.0)
        ttft = []
        for _ in range(args.requests):
            t = time.perf_counter()
            out = llm.generate(prompt(), one, use_tqdm=False)
            ttft.append((time.perf_counter() - t, out.metrics.time_to_first_token))
        print("TTFT per request, one after another (wall ms / metrics ms): "
              + ", ".join(f"{a * 1e3:.1f}/{(b or 0) * 1e3:.1f}" for a, b in ttft))
        gen = llm.generate(prompt(), SamplingParams(max_tokens=128, min_tokens=128, temperature=0.0,
                                                    ignore_eos=True), use_tqdm=False)
        print(f"TPOT (128 tokens, batch 1): {gen.metrics.time_per_output_token * 1e3:.3f} ms; "
              f"TTFT {gen.metrics.time_to_first_token * 1e3:.1f} ms")

        runner = llm.executor.engine.runner
        n_blocks = -(-args.isl // runner.block_size)

        def prefill():
            r = Request("prof", prompt(), one, frozenset(), 1)
            r.block_ids = list(range(1, 1 + n_blocks))
            runner.execute(ScheduledBatch([r], [args.isl]))

        with torch.inference_mode():
            prefill()
            sync()
            launch, wall = [], []
            for _ in range(5):
                t = time.perf_counter()
                prefill()
                launch.append(time.perf_counter() - t)
                sync()
                wall.append(time.perf_counter() - t)
            print(f"prefill {args.isl} tokens via ModelRunner.execute: wall {statistics.median(wall) * 1e3:.1f} ms, "
                  f"host returns after {statistics.median(launch) * 1e3:.1f} ms (median of 5)")
            # the model's forward alone: host time to launch it, and with the GPU's work
            r = Request("prof", prompt(), one, frozenset(), 1)
            r.block_ids = list(range(1, 1 + n_blocks))
            ids, pos, meta = runner.prepare(ScheduledBatch([r], [args.isl]))
            fwd_launch, fwd_wall = [], []
            for _ in range(5):
                sync()
                t = time.perf_counter()
                runner.model(ids, pos, meta)
                fwd_launch.append(time.perf_counter() - t)
                sync()
                fwd_wall.append(time.perf_counter() - t)
            print(f"  model forward alone: wall {statistics.median(fwd_wall) * 1e3:.1f} ms, host launch "
                  f"{statistics.median(fwd_launch) * 1e3:.1f} ms")
            with profile(activities=acts) as prof:
                for _ in range(3):
                    prefill()
                sync()
            kernel_table(prof, 3, os.path.join(args.out, f"prefill_{label}.txt"),
                         f"prefill {args.isl} tokens ({label})")
            cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
            print("   host (self CPU ms per prefill, calls):")
            for ev in cpu:
                print(f"   {ev.self_cpu_time_total / 3e3:8.2f} ms  x{ev.count // 3:<5} {ev.key[:70]}")

            graphs = runner.graphs
            if graphs is not None and 1 in graphs.graphs and cuda:
                g = graphs.graphs[1]
                graphs.seq_lens[:1].fill_(args.isl)
                graphs.slot_mapping[:1].fill_(-1)
                step = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(30):
                    step[0].record()
                    g.replay()
                    step[1].record()
                    sync()
                    times.append(step[0].elapsed_time(step[1]))
                print(f"decode step at batch 1 (CUDA graph replay, context {args.isl}): "
                      f"{statistics.median(times):.3f} ms median of 30")
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        g.replay()
                    sync()
                kernel_table(prof, 10, os.path.join(args.out, f"decode_{label}.txt"), f"decode step, batch 1 ({label})")
            else:
                print("no batch-1 decode graph captured")
    finally:
        llm.shutdown()
        del llm
        triton_moe.moe_gemm_config = saved
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="configs/qwen3-30b-a3b.json")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-num-tokens", type=int, default=2048)
    ap.add_argument("--variants", default="default,gemm")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/moe-profile"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for label in args.variants.split(","):
        run_variant(label, args)


if __name__ == "__main__":
    main()
