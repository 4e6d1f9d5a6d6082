"""Where FP8 throughput goes at large batch: per linear of the Llama-3.1-8B shape, time (CUDA graph
replays, so launch overhead is excluded as in the engine's decode graphs) of

- bf16 ``F.linear`` (the baseline),
- the engine's FP8 path (``rtllm.kernels.quant_gemm.fp8_gemm``: per-token activation quantization
  + ``torch._scaled_mm`` with row-wise scales),
- its two parts alone: the activation quantization (the torch reference and the engine's Triton
  kernel, checked bit-equal here), and ``_scaled_mm`` row-wise on pre-quantized input,
- ``_scaled_mm`` with per-tensor scales (the fastest FP8 tensor-core GEMM torch has), for reference.

Prints us per call, TFLOP/s and the speed-up over bf16. Usage: python scripts/fp8_gemm_bench.py [M ...]
"""

import sys

import torch
import torch.nn.functional as F

from rtllm.bench.bounds import cuda_graphed, time_cuda
from rtllm.kernels.quant_gemm import fp8_gemm, quantize_fp8_per_token
from rtllm.kernels.triton_fp8_quant import quantize_fp8_per_token_triton

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def graph_time(fn, iters: int = 50) -> float:
    """us per call of ``fn`` replayed ``iters`` times inside one CUDA graph (median of 5 replays)."""
    return time_cuda(cuda_graphed(fn, iters), iters=5) * 1e6 / iters


def bench_row(name: str, w: torch.Tensor, wq: torch.Tensor, wscale: torch.Tensor, m: int) -> str:
    n, k = w.shape
    x = torch.randn(m, k, device=w.device, dtype=torch.bfloat16)
    xq, sx = quantize_fp8_per_token(x)
    xq_t, sx_t = quantize_fp8_per_token_triton(x)  # the engine's kernel: the same bits on the GPU too
    assert torch.equal(sx_t, sx) and torch.equal(xq_t.view(torch.uint8), xq.view(torch.uint8)), name
    one = torch.ones((), device=w.device)
    t_bf16 = graph_time(lambda: F.linear(x, w))
    t_path = graph_time(lambda: fp8_gemm(x, wq, wscale))
    t_quant = graph_time(lambda: quantize_fp8_per_token(x))
    t_qtri = graph_time(lambda: quantize_fp8_per_token_triton(x))
    t_row = graph_time(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=wscale.view(1, -1),
                                                out_dtype=torch.bfloat16))
    t_tensor = graph_time(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    flop = 2 * m * n * k
    return (f"{name:>8} {m:>5} | {t_bf16:7.1f}u | {t_path:7.1f}u {t_bf16 / t_path:4.2f}x | {t_quant:6.1f}u "
            f"{t_qtri:7.1f}u {t_row:9.1f}u | {t_tensor:8.1f}u {t_bf16 / t_tensor:4.2f}x   "
            f"(bf16 {flop / t_bf16 / 1e6:.0f} TFLOP/s, fp8 row {flop / t_row / 1e6:.0f})")


def main() -> None:
    ms = [int(a) for a in sys.argv[1:]] or [64, 256, 512, 2048]
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':>8} {'M':>5} | {'bf16':>8} | {'fp8 path':>8} {'x':>5} | {'quant':>7} {'q triton':>8} "
          f"{'mm rowwise':>10} | {'mm tensor':>9} {'x':>5}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        wscale = w.float().abs().amax(dim=1) / 448.0
        wq = (w.float() / wscale[:, None]).to(torch.float8_e4m3fn)
        for m in ms:
            print(bench_row(name, w, wq, wscale, m))


if __name__ == "__main__":
    main()
