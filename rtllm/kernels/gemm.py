"""Dense GEMM of the Linear layers: ``torch.nn.functional.linear`` (cuBLAS / oneDNN), the decode GEMV
kernel on CUDA at 1..DENSE_GEMV_MAX_M rows, oneDNN with a pre-packed weight on the CPU, or a kernel a
plugin registered as "linear" (rtllm.kernels.dispatch.register_kernel); and the weight layout it reads
fastest on the device (:func:`fast_weight_layout`, :func:`pack_for_cpu`).

Pre-packed CPU weights (:func:`pack_for_cpu`): ``F.linear`` on a CPU hands oneDNN / MKL a plain [N, K]
weight, which they reorder into their blocked layout on every call, reading and writing the whole weight
again when it is not in cache (a decode step streams every weight from DRAM). Reordered once at load
(``torch.ops.mkldnn._reorder_linear_weight``, run by ``torch.ops.mkldnn._linear_pointwise``), the default
model's 30 layers of GEMMs took 11.4 / 15.9 ms at 1 / 16 rows in bf16 against 19.0 / 29.5 ms, and its
49152-row LM head 2.5 / 3.6 ms against 4.5 / 6.6 ms (2-core AMD EPYC, AVX-512 BF16;
scripts/cpu_gemm_bench.py, docs/PERF.md). In
bf16 and fp16 the packed GEMM gives F.linear's bits (the same oneDNN kernel, without the per-call
reorder). fp32 F.linear runs MKL, whose sums the oneDNN kernel adds in another order (relative
differences ~1e-6; greedy outputs and the 1e-4 logit parity with transformers hold in the tests): the
default model's fp32 decode at 16 concurrent requests went 101-108 -> 149-151 output tok/s with it.
RTLLM_CPU_PACKED_WEIGHTS=0 turns packing off.

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
    """y = x @ weight^T (+ bias); weight [N, K], in either memory layout (see fast_weight_layout), or a
    parameter that carries a CPU-packed copy (pack_for_cpu)."""
    if (fn := custom_kernel("linear", x)) is not None:
        return fn(x, weight, bias)
    packed = getattr(weight, "cpu_packed", None)
    if packed is not None and x.device.type == "cpu" and x.dtype == packed.dtype:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])
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


def _packing_on() -> bool:
    mode = os.environ.get("RTLLM_CPU_PACKED_WEIGHTS", "1")
    if mode not in ("0", "1"):
        raise ValueError(f"RTLLM_CPU_PACKED_WEIGHTS={mode!r}: expected 1 (pack CPU weights, the default) or 0")
    return mode == "1"


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a CPU weight [N, K] for :func:`linear` (the module docstring says why), or
    None where it does not apply: not on a CPU, not 2-D, not fp32 / bf16 / fp16, packing turned off
    (RTLLM_CPU_PACKED_WEIGHTS=0), a torch without oneDNN, or a CPU whose oneDNN packs no such weight (fp16
    needs AVX-512 FP16 or AVX-NE-CONVERT). The caller attaches it to the parameter as ``cpu_packed``; it
    is a copy, taken once: a weight changed afterwards must be packed again."""
    if (not _packing_on() or weight.device.type != "cpu" or weight.dim() != 2
            or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    except RuntimeError as e:  # this CPU's oneDNN has no packed kernel for the dtype
        _log_unpackable(weight.dtype, str(e))
        return None


@functools.cache
def _log_unpackable(dtype: torch.dtype, why: str) -> None:
    logger.info("CPU GEMM: %s weights stay unpacked on this CPU (%s)", str(dtype).removeprefix("torch."), why)
