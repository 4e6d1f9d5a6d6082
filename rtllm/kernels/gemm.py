"""Dense GEMM of the Linear layers: ``torch.nn.functional.linear`` (cuBLAS / oneDNN), the decode GEMV
kernel on CUDA at 1..DENSE_GEMV_MAX_M rows, or a kernel a plugin registered as "linear"
(rtllm.kernels.dispatch.register_kernel); and the weight layout it reads fastest on the device
(:func:`fast_weight_layout`).

Decode GEMV (rtllm.kernels.triton_quant_gemv.w16_gemv): at one row a dense projection is a weight
stream; cuBLAS's M = 1 kernels read it at 68-88% of an H100's copy bandwidth on the narrow shapes
(with a split-K reduce launch after them), and the GEMV took 2-16% less time than cuBLAS at M = 1 on
every Llama-3.1-8B and Qwen3-30B-A3B shape (docs/PERF.md). It is a programmatic dependent launch on
Hopper (its weight stream starts during the previous kernel), and for the gated MLP's [gate | up]
projection (:func:`linear_silu_and_mul`) it applies SiLU-and-mul in its epilogue (no activation
launch, no [M, 2I] round trip). 16-bit x and weight, no bias; sums in fp32 and one rounding
to x's dtype, as cuBLAS, in another order. RTLLM_DENSE_GEMV=0 keeps F.linear (for comparisons).
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch
import torch.nn.functional as F

from rtllm.kernels.activation import silu_and_mul
from rtllm.kernels.dispatch import custom_kernel, triton_enabled
from rtllm.kernels.quant_gemm import GEMV_SILU

logger = logging.getLogger("rtllm")


# M = 1 only: at M = 2 cuBLAS won on every Llama-3.1-8B / Qwen3-30B-A3B shape (docs/PERF.md)
DENSE_GEMV_MAX_M = 1 if os.environ.get("RTLLM_DENSE_GEMV", "1") != "0" else 0


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether x @ weight^T runs the decode GEMV: CUDA (Triton on), 1..DENSE_GEMV_MAX_M flat rows,
    x and a row-major weight in the same 16-bit dtype, no bias."""
    return (bias is None and x.dim() == 2 and 0 < x.shape[0] <= DENSE_GEMV_MAX_M and triton_enabled(x)
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.dim() == 2
            and weight.stride(1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T (+ bias); weight [N, K], in either memory layout (see fast_weight_layout)."""
    if (fn := custom_kernel("linear", x)) is not None:
        return fn(x, weight, bias)
    if _gemv(x, weight, bias):
        from rtllm.kernels.triton_quant_gemv import w16_gemv

        return w16_gemv(x, weight)
    return F.linear(x, weight, bias)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x, weight, bias)) for a [gate | up] weight [2I, K]: one launch where the GEMV
    runs it and no plugin replaces "linear" or "silu_and_mul"; else the two in turn."""
    if (GEMV_SILU and _gemv(x, weight, bias) and custom_kernel("linear", x) is None
            and custom_kernel("silu_and_mul", x) is None):
        from rtllm.kernels.triton_quant_gemv import w16_gemv

        return w16_gemv(x, weight, silu_and_mul=True)
    return silu_and_mul(linear(x, weight, bias))


def _best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def cpu_fp32_prefers_column_major() -> bool:
    """Whether this CPU's fp32 GEMM runs faster with the weight stored column-major, timed once per
    process on a decode-sized product (16 rows, 1024 x 1024; ~20 ms).

    ``F.linear(x, W)`` multiplies by W^T. With W row-major ([N, K] contiguous) oneDNN / MKL take a
    transposed B, and on a 2-core Xeon (AVX-512, PyTorch 2.13) that path ran 2-8x slower at 8-32 rows
    than B as stored (W kept as a contiguous [K, N] seen through .t()); equal at 1-2 and >= 256 rows.
    Other CPUs may differ, hence the measurement: column-major only where it wins by 1.2x.
    RTLLM_CPU_WEIGHT_LAYOUT=row / column skips the measurement (benchmarks compare both so)."""
    forced = os.environ.get("RTLLM_CPU_WEIGHT_LAYOUT", "auto")
    if forced not in ("auto", "row", "column"):
        raise ValueError(f"RTLLM_CPU_WEIGHT_LAYOUT={forced!r}: expected auto, row or column")
    if forced != "auto":
        return forced == "column"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1024, generator=g)
    w = torch.randn(1024, 1024, generator=g)
    wc = w.t().contiguous().t()
    F.linear(x, w), F.linear(x, wc)  # first calls allocate and pick kernels
    row = _best_of(lambda: F.linear(x, w), 5)
    col = _best_of(lambda: F.linear(x, wc), 5)
    prefer = col * 1.2 < row
    logger.info("CPU fp32 GEMM, 16 x 1024 x 1024: row-major weight %.0f us, column-major %.0f us: %s",
                row * 1e6, col * 1e6, "column-major weights" if prefer else "row-major weights")
    return prefer


def fast_weight_layout(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] (same shape and values) in the memory layout :func:`linear` reads fastest on
    its device: column-major for fp32 on a CPU where that measured faster
    (:func:`cpu_fp32_prefers_column_major`), else as it is. The same tensor when nothing changes."""
    if (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.stride(1) == 1 and cpu_fp32_prefers_column_major()):
        return weight.t().contiguous().t()
    return weight
