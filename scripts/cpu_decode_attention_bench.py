"""Decode attention on the CPU: the padded batch's block-diagonal matmuls, the per-KV-head matmuls (over
K/V copied head-major) and one masked SDPA call, interleaved in one process (default model's heads: 9
query, 3 KV, head_dim 64).

    python scripts/cpu_decode_attention_bench.py [--batch 4,16] [--context 80,400,1000,2000]

Prints microseconds per call (median of rounds) of each variant and the block-diagonal one's ratios, per
dtype, batch size and context length, with the largest difference from the SDPA output.
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
                for variant in VARIANTS:
                    call = functools.partial(_run, variant, inputs)
                    outs[variant] = call()
                    times[variant] = bench(call, max(2, 20000 // ctx), args.rounds)
                diff = max((outs[v].float() - outs["sdpa"].float()).abs().max().item() for v in VARIANTS)
                cols = "  ".join(f"{v} {times[v]:7.0f} us" for v in VARIANTS)
                print(f"{name:8s} B={B:3d} ctx={ctx:5d}  {cols}  block-diagonal / per-head "
                      f"{times['block-diagonal'] / times['per-head']:5.2f}x  / sdpa "
                      f"{times['block-diagonal'] / times['sdpa']:5.2f}x  max|diff| {diff:.2g}", flush=True)


# the padded batch's ways: "matmul" is block-diagonal at Hkv = 3 unless the limit is lowered below it
VARIANTS = ("block-diagonal", "per-head", "sdpa")


def _run(variant: str, inputs: tuple) -> torch.Tensor:
    if variant == "sdpa":
        return att.paged_decode_attention_torch(*inputs, method="sdpa")
    limit = att.BLOCK_DIAGONAL_MAX_KV_HEADS
    att.BLOCK_DIAGONAL_MAX_KV_HEADS = limit if variant == "block-diagonal" else 0
    try:
        return att.paged_decode_attention_torch(*inputs, method="matmul")
    finally:
        att.BLOCK_DIAGONAL_MAX_KV_HEADS = limit


if __name__ == "__main__":
    main()
