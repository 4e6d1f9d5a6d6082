"""FP8 activation quantization fused into its producers, at the Llama-3.1-8B shape (hidden 4096,
intermediate 14336) and M rows (prefill / large decode batches, where FP8Linear quantizes its input):

- input norm -> qkv (6144 x 4096) and post-attention norm -> gate_up (28672 x 4096): unfused = the
  fused residual-add RMSNorm kernel, then ``fp8_gemm`` (per-token quantization kernel + ``_scaled_mm``);
  fused = ``rms_norm_fp8`` (norm + quantization in one kernel) + ``fp8_scaled_mm``;
- SiLU-and-mul -> down (4096 x 14336): unfused = ``silu_and_mul`` then ``fp8_gemm``; fused =
  ``silu_and_mul_fp8`` + ``fp8_scaled_mm``;

each also split into its producer part (producer + quantization vs the fused kernel). Time: CUDA-graph
replays (50 calls a graph, median of 5), as the engine's decode graphs launch them. Agreement: the fused
e4m3 codes and scales against the producer kernel + quantization kernel, and the GEMM outputs, bit for
bit. Usage: python scripts/fp8_fused_quant_bench.py [M ...]        (default 512 2048)
"""

from __future__ import annotations

import sys

import torch

from rtllm.bench.bounds import cuda_graphed, time_cuda
from rtllm.kernels import activation, norm
from rtllm.kernels import quant_gemm as qg

HIDDEN, INTER = 4096, 14336
EPS = 1e-5


def graph_time(fn, iters: int = 50) -> float:
    """us per call of ``fn`` replayed ``iters`` times inside one CUDA graph (median of 5 replays)."""
    return time_cuda(cuda_graphed(fn, iters), iters=5) * 1e6 / iters


def fp8_weight(n: int, k: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device=dev) / k ** 0.5
    scale = w.abs().amax(dim=1) / 448.0
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale


def same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def row(name: str, m: int, unfused_prod, fused_prod, wq, ws) -> str:
    """Times of (producer + quantization) vs the fused kernel, and of each with the GEMM after it."""
    want_q, got_q = qg.quantize_fp8(unfused_prod()), fused_prod()
    agree = same(want_q, got_q) and torch.equal(qg.fp8_scaled_mm(*want_q, wq, ws), qg.fp8_scaled_mm(*got_q, wq, ws))
    why = ""
    if not agree:  # which part differs, and whether the unfused path or the GEMM repeats itself
        n_q = int((want_q[0].view(torch.uint8) != got_q[0].view(torch.uint8)).sum())
        again = same(want_q, qg.quantize_fp8(unfused_prod()))
        mm_again = torch.equal(qg.fp8_scaled_mm(*want_q, wq, ws), qg.fp8_scaled_mm(*want_q, wq, ws))
        why = (f" (e4m3 bytes differing: {n_q}, scales: {int((want_q[1] != got_q[1]).sum())}, "
               f"unfused twice equal: {again}, GEMM twice equal: {mm_again})")
    t_prod = graph_time(unfused_prod)
    t_prod_q = graph_time(lambda: qg.quantize_fp8(unfused_prod()))
    t_fused = graph_time(fused_prod)
    t_path = graph_time(lambda: qg.fp8_gemm(unfused_prod(), wq, ws))
    t_path_fused = graph_time(lambda: qg.fp8_scaled_mm(*fused_prod(), wq, ws))
    return (f"{name:>15} {m:>5} | {t_prod:6.1f}u {t_prod_q:7.1f}u {t_fused:7.1f}u | {t_path:7.1f}u "
            f"{t_path_fused:7.1f}u {t_path - t_path_fused:6.1f}u {t_path / t_path_fused:5.3f}x | "
            f"{'bit-equal' if agree else 'DIFFERENT'}{why}")


def rows_at(m: int, nw: torch.Tensor, weights: dict, dev: torch.device) -> list[str]:
    x = torch.randn(m, HIDDEN, device=dev, dtype=torch.bfloat16)
    r = torch.randn(m, HIDDEN, device=dev, dtype=torch.bfloat16)
    gu = torch.randn(m, 2 * INTER, device=dev, dtype=torch.bfloat16)
    add_norm = (lambda: norm.fused_add_rms_norm(x, r, nw, EPS)[0], lambda: norm.rms_norm_fp8(x, r, nw, EPS)[:2])
    return [row("add+norm -> qkv", m, *add_norm, *weights["qkv"]),
            row("add+norm -> gu", m, *add_norm, *weights["gate_up"]),
            row("norm -> qkv", m, lambda: norm.rms_norm(x, nw, EPS), lambda: norm.rms_norm_fp8(x, None, nw, EPS)[:2],
                *weights["qkv"]),
            row("silu -> down", m, lambda: activation.silu_and_mul(gu), lambda: activation.silu_and_mul_fp8(gu),
                *weights["down"])]


def main() -> None:
    ms = [int(a) for a in sys.argv[1:]] or [512, 2048]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'producer -> mm':>15} {'M':>5} | {'prod':>7} {'prod+q':>8} {'fused':>8} | {'unfused':>8} "
          f"{'fused':>8} {'saved':>7} {'x':>6} | agreement")
    weights = {"qkv": fp8_weight(6144, HIDDEN, dev), "gate_up": fp8_weight(2 * INTER, HIDDEN, dev),
               "down": fp8_weight(HIDDEN, INTER, dev)}
    nw = (1 + 0.1 * torch.randn(HIDDEN, device=dev)).to(torch.bfloat16)
    for m in ms:
        for line in rows_at(m, nw, weights, dev):
            print(line, flush=True)
    print("u = us per call. prod: the producer kernel alone; prod+q: it and the quantization kernel; fused: "
          "the fused kernel; unfused / fused: with the FP8 GEMM after it; saved: per linear layer "
          "(a decoder layer has one of each: add+norm -> qkv, add+norm -> gate_up, silu -> down)")


if __name__ == "__main__":
    main()
