"""Decode attention on the CPU: the padded batched matmuls against one masked SDPA call over the
padded batch, interleaved in one process (default model's heads: 9 query, 3 KV, head_dim 64).

    python scripts/cpu_decode_attention_bench.py [--batch 4,16] [--context 80,400,1000,2000]

Prints microseconds per call (median of rounds) of each variant and their ratio, per dtype, batch
size and context length, with the largest difference from the matmul path's output.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from rtllm.kernels import attention as att


def bench(fn, reps: int, rounds: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="4,16")
    ap.add_argument("--context", default="80,400,1000,2000")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    Hq, Hkv, D, bs = 9, 3, 64, 16
    g = torch.Generator().manual_seed(0)
    print(f"# threads={torch.get_num_threads()}  Hq={Hq} Hkv={Hkv} D={D} block={bs}")
    for name in args.dtypes.split(","):
        dt = getattr(torch, name)
        for B in map(int, args.batch.split(",")):
            for ctx in map(int, args.context.split(",")):
                per_row = ctx // bs + 2
                kc = torch.randn(B * per_row + 1, bs, Hkv, D, generator=g).to(dt)
                vc = torch.randn(B * per_row + 1, bs, Hkv, D, generator=g).to(dt)
                bt = (torch.randperm(B * per_row, generator=g) + 1).view(B, per_row).int()
                seq = torch.randint(max(ctx - ctx // 4, 1), ctx + 1, (B,), generator=g).int()
                q = torch.randn(B, Hq, D, generator=g).to(dt)
                k, v = torch.randn(B, Hkv, D, generator=g).to(dt), torch.randn(B, Hkv, D, generator=g).to(dt)
                L = int(seq.max())
                gather = att.PagedGather(bt, seq, L, bs)
                outs, times = {}, {}
                inputs = (q, k, v, kc, vc, bt, seq, D ** -0.5, L, gather)
                for variant in ("matmul", "sdpa"):
                    call = functools.partial(att.paged_decode_attention_torch, *inputs, method=variant)
                    outs[variant] = call()
                    times[variant] = bench(call, max(2, 20000 // ctx), args.rounds)
                diff = (outs["sdpa"].float() - outs["matmul"].float()).abs().max().item()
                print(f"{name:8s} B={B:3d} ctx={ctx:5d}  matmul {times['matmul']:8.0f} us  sdpa {times['sdpa']:8.0f} us"
                      f"  matmul/sdpa {times['matmul'] / times['sdpa']:5.2f}x  max|diff| {diff:.2g}", flush=True)


if __name__ == "__main__":
    main()
