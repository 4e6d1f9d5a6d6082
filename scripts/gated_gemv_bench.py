"""SiLU-and-mul in the decode GEMV's epilogue (rtllm.kernels.triton_quant_gemv, ``silu_and_mul=True``):
at the Llama-3.1-8B gate|up shape (N = 2 x 14336, K = 4096), M = 1 and 2, for W4A16 g128, INT8 and
FP8 (weight-only) weights, the engine's dispatch of

- unfused: the gate|up GEMM (rtllm.kernels.quant_gemm: the GEMV with its tuned configuration), then
  ``silu_and_mul`` (the Triton activation kernel): two launches and a [M, 2I] round trip,
- fused: ``quant_gemm.*_silu_and_mul``: one launch, the same configuration,

and the two parts of the unfused path alone. Time: median of 5 replays of a CUDA graph of 60 calls
that rotate over enough weight copies (>= 128 MiB) that L2 never holds the weight. Agreement: the
fused output against the unfused one, bit for bit (mismatching elements and the largest difference
are printed; both paths round gate / up, silu and the product the same way). Usage:

    python scripts/gated_gemv_bench.py [M ...]        (default 1 2)
"""

from __future__ import annotations

import itertools
import math
import sys

import torch

from rtllm.bench.bounds import cuda_graphed, time_cuda
from rtllm.kernels import quant_gemm as qg
from rtllm.kernels.activation import silu_and_mul

INTER, HIDDEN = 14336, 4096
GROUP = 128
CALLS = 60


def graph_time(fns: list) -> float:
    """us per call: a CUDA graph of CALLS calls cycling over ``fns`` (one per weight copy)."""
    it = itertools.cycle(fns)
    return time_cuda(cuda_graphed(lambda: next(it)(), CALLS), iters=5) * 1e6 / CALLS


def weights(fmt: str, N: int, K: int, dev: torch.device) -> tuple:
    if fmt == "w4":
        qw = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
        s = (torch.rand(K // GROUP, N, device=dev) * 0.004 + 1e-4).to(torch.bfloat16)
        z = (torch.randn(K // GROUP, N, device=dev) * 0.002).to(torch.bfloat16)
        return qw, s, z
    s = torch.rand(N, device=dev) * 0.002 + 1e-4
    if fmt == "int8":
        return torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev), s
    return (torch.randn(N, K, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn), s * 0.01


def nbytes(w: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in w)


FORMATS = {  # name -> (format key, unfused GEMM, fused GEMM + SiLU-and-mul)
    "W4A16 g128": ("w4", qg.w4a16_gemm, qg.w4a16_gemm_silu_and_mul),
    "INT8": ("int8", qg.w8a16_gemm, qg.w8a16_gemm_silu_and_mul),
    "FP8 (weight-only)": ("fp8", qg.fp8_gemm, qg.fp8_gemm_silu_and_mul),
}


def bench_row(name: str, gemm, fused, ws: list[tuple], m: int) -> str:
    x = torch.randn(m, HIDDEN, device=ws[0][0].device, dtype=torch.bfloat16)
    gu = gemm(x, *ws[0])
    want = silu_and_mul(gu)
    got = fused(x, *ws[0])
    bad = (got != want).sum().item()
    diff = (got.float() - want.float()).abs().max().item()
    agree = "bit-equal" if bad == 0 else f"{bad} of {got.numel()} differ, max |diff| {diff:.3g}"
    t_gemv = graph_time([lambda w=w: gemm(x, *w) for w in ws])
    t_silu = graph_time([lambda: silu_and_mul(gu)])
    t_unfused = graph_time([lambda w=w: silu_and_mul(gemm(x, *w)) for w in ws])
    t_fused = graph_time([lambda w=w: fused(x, *w) for w in ws])
    return (f"{name:>18} {m:>2} | {t_gemv:7.1f}u {t_silu:6.1f}u {t_unfused:7.1f}u | {t_fused:7.1f}u "
            f"{t_unfused - t_fused:6.1f}u | {agree}")


def main() -> None:
    ms = [int(a) for a in sys.argv[1:]] or [1, 2]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; gate_up {2 * INTER} x {HIDDEN}")
    print(f"{'format':>18} {'M':>2} | {'GEMV':>8} {'silu':>7} {'unfused':>8} | {'fused':>8} {'saved':>7} | agreement")
    for name, (fmt, gemm, fused) in FORMATS.items():
        w0 = weights(fmt, 2 * INTER, HIDDEN, dev)
        ws = [w0] + [weights(fmt, 2 * INTER, HIDDEN, dev) for _ in range(max(1, math.ceil(128 * 2**20 / nbytes(w0))))]
        for m in ms:
            print(bench_row(name, gemm, fused, ws, m), flush=True)
        del ws, w0
        torch.cuda.empty_cache()
    print("u = us per call; saved = unfused - fused (per gated MLP; x32 layers per decode step at the 8B shape)")


if __name__ == "__main__":
    main()
