"""The weight-only INT8 / e4m3 GEMM at M > 16 (prefill, large decode batches; the INT8 LM head of every
quantized model): the Triton tensor-core kernel (byte -> bf16 in registers, per-row scale in the
epilogue) against bf16 cuBLAS on a dense weight and against the path it replaces (the weight
converted to bf16 for one cuBLAS GEMM, output scaled), at the Llama-3.1-8B shapes. Each candidate
tile configuration is timed (CUDA-graph replays, median) and checked against the fp32 reference;
the best per M is printed as a ``W8_LARGE_M`` row for rtllm/kernels/triton_quant_gemm.py.

    python scripts/w8_gemm_bench.py [M ...]        (default 64 128 512 2048)
"""

import sys

import torch

from rtllm.bench.bounds import cuda_graphed, time_cuda
from rtllm.kernels.quant_gemm import w8a16_gemm_reference
from rtllm.kernels.triton_quant_gemm import W8_LARGE_M, w8a16_gemm_triton

SHAPES = {"lm_head": (128256, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096)}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
CANDIDATES = [(64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
              (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3)]


def graph_us(fn, iters: int = 10) -> float:
    return time_cuda(cuda_graphed(fn, iters), iters=5) * 1e6 / iters


def with_config(cfg):
    """w8a16_gemm_triton with the large-M table answering ``cfg`` (BLOCK_M through the override)."""
    import rtllm.kernels.triton_quant_gemm as tq

    def run(x, q, s):
        saved = tq._w8_large_m_config
        tq._w8_large_m_config = lambda M, interp: cfg
        try:
            return w8a16_gemm_triton(x, q, s)
        finally:
            tq._w8_large_m_config = saved
    return run


def bench(name: str, q: torch.Tensor, s: torch.Tensor, w: torch.Tensor, m: int) -> str:
    """One shape at M = m: the baselines and every candidate configuration."""
    n, k = q.shape
    x = torch.randn(m, k, device=q.device, dtype=torch.bfloat16)
    ref = w8a16_gemm_reference(x, q, s).float()
    t_bf16 = graph_us(lambda: torch.mm(x, w.t()))
    t_old = graph_us(lambda: (torch.mm(x, q.t().to(x.dtype)) * s).to(x.dtype))
    flops = 2 * m * n * k
    row = [f"{name:8s} M={m:5d}: bf16 cuBLAS {t_bf16:8.1f} us ({flops / t_bf16 / 1e6:5.0f} TFLOP/s), "
           f"convert+cuBLAS {t_old:8.1f} us"]
    best = None
    for cfg in CANDIDATES:
        fn = with_config(cfg)
        try:
            y = fn(x, q, s).float()
            t = graph_us(lambda fn=fn: fn(x, q, s))
        except Exception as e:  # noqa: BLE001 - a configuration that does not fit (shared memory)
            row.append(f"    {cfg}: failed ({type(e).__name__})")
            continue
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        ok = err < 1e-2
        row.append(f"    {cfg}: {t:8.1f} us  {flops / t / 1e6:5.0f} TFLOP/s  vs bf16 {t_bf16 / t:4.2f}x  "
                   f"vs convert {t_old / t:4.2f}x  rel err {err:.1e}{'' if ok else '  WRONG'}")
        if ok and (best is None or t < best[0]):
            best = (t, cfg)
    if best:
        row.append(f"    best {best[1]}: {best[0]:.1f} us ({t_old / best[0]:.2f}x the convert path)")
    return "\n".join(row)


def main() -> None:
    ms = [int(a) for a in sys.argv[1:]] or [64, 128, 512, 2048]
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}; committed table W8_LARGE_M = {W8_LARGE_M}")
    for name, (n, k) in SHAPES.items():
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        s = torch.rand(n, device="cuda") * 0.01 + 0.001
        w = (q.to(torch.bfloat16) * s[:, None].to(torch.bfloat16)).contiguous()
        for m in ms:
            print(bench(name, q, s, w, m), flush=True)


if __name__ == "__main__":
    main()
