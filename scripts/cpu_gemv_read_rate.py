"""How fast the CPU's bf16 decode GEMV reads its weight, against a plain read of the same bytes (the bound).

    python scripts/cpu_gemv_read_rate.py [--n 3072] [--k 576] [--copies 64] [--reps 300]

One [1, K] x [K, N] product (default: the default model's gate|up projection) over ``copies`` distinct
weights (rotated, so each call streams its weight from DRAM as a decode step does): ``w.sum()`` (the read
rate), the oneDNN-packed GEMV the runner uses (rtllm.kernels.gemm.pack_for_cpu), the same packed with a
batch-size hint of 1 / 16 / 64, F.linear on the plain weight, and ``torch.mv``. Microseconds a call (mean of
``reps``) and GB/s of weight bytes, all in one process.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def per_call(fn, reps: int) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--copies", type=int, default=64)
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    ws = [torch.randn(args.n, args.k).bfloat16() for _ in range(args.copies)]
    x = torch.randn(1, args.k).bfloat16()
    nbytes = args.n * args.k * 2
    it = iter(range(1 << 62))

    def rotating(op, weights):
        return lambda: op(weights[next(it) % len(weights)])

    variants = {"sum (read rate)": rotating(torch.Tensor.sum, ws),
                "F.linear, plain weight": rotating(lambda w: F.linear(x, w), ws),
                "torch.mv": rotating(lambda w: torch.mv(w, x[0]), ws)}
    for hint in (None, 1, 16, 64):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in ws]
        name = "oneDNN packed (the runner's)" if hint is None else f"oneDNN packed, batch hint {hint}"
        variants[name] = rotating(lambda p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), packed)
    print(f"# [1, {args.k}] x [{args.k}, {args.n}] bf16, {args.copies} weights rotated, "
          f"{torch.get_num_threads()} threads")
    for name, fn in variants.items():
        t = per_call(fn, args.reps)
        print(f"{name:32s} {t * 1e6:7.1f} us  {nbytes / t / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
