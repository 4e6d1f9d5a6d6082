"""Tune the weight-only GEMM kernels for decode (M = 1) at Llama-3.1-8B shapes on the GPU.

    python3 scripts/quant_kernel_tune.py

For each shape: the default configuration's time and bandwidth, then the best (block_n, block_k,
split_k) found by a small grid search; bandwidth = weight bytes (codes + scales) / time, against a
device-to-device copy measured in the same run.
"""

from __future__ import annotations

import itertools
from functools import partial

import torch

from rtllm.kernels.triton_quant_gemm import w4_gemv_triton, w4a16_gemm_triton, w8a16_gemm_triton

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _time(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3


def copy_bw() -> float:
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / _time(lambda: b.copy_(a), 20)


def main() -> None:
    dev = torch.device("cuda")
    bw = copy_bw()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    x = torch.randn(1, 14336, dtype=torch.bfloat16, device=dev)
    grid = list(itertools.product([32, 64, 128, 256], [32, 64, 128], [1, 2, 4, 8, 16]))
    for name, (N, K) in SHAPES.items():
        xs = x[:, :K].contiguous()
        qw4 = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
        s4 = torch.rand(K // 128, N, dtype=torch.bfloat16, device=dev)
        z4 = torch.rand_like(s4)
        q8 = torch.randint(-127, 127, (N, K), dtype=torch.int8, device=dev)
        f8 = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn)
        s8 = torch.rand(N, device=dev)
        dense = torch.randn(N, K, dtype=torch.bfloat16, device=dev)
        t_dense = _time(partial(torch.nn.functional.linear, xs, dense))
        print(f"{name} N={N} K={K}: bf16 F.linear {t_dense * 1e6:.1f} us ({N * K * 2 / t_dense / bw:.0%} of copy)")
        cases = {
            "w4a16 g128": (partial(w4a16_gemm_triton, xs, qw4, s4, z4), N * K // 2 + 2 * s4.numel() * 2),
            "w4 gemv": (partial(w4_gemv_triton, xs, qw4, s4, z4), N * K // 2 + 2 * s4.numel() * 2),
            "w8a16 int8": (partial(w8a16_gemm_triton, xs, q8, s8), N * K + N * 4),
            "w8a16 fp8": (partial(w8a16_gemm_triton, xs, f8, s8), N * K + N * 4),
        }
        for label, (fn, nbytes) in cases.items():
            t0 = _time(fn)
            best = (t0, "default")
            for bn, bk, sk in grid:
                if label.startswith("w4") and bk > 128 or label == "w4 gemv" and bn < 64:
                    continue
                try:
                    t = _time(partial(fn, block_n=bn, block_k=bk, split_k=sk), 20)
                except Exception:  # out of resources for this tile
                    continue
                if t < best[0]:
                    best = (t, f"block_n={bn} block_k={bk} split_k={sk}")
            print(f"  {label:11s} default {t0 * 1e6:7.1f} us ({nbytes / t0 / bw:4.0%} of copy) | best "
                  f"{best[0] * 1e6:7.1f} us ({nbytes / best[0] / bw:4.0%}) {best[1]}")


if __name__ == "__main__":
    main()
