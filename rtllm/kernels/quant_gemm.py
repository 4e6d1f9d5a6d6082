"""Quantized GEMMs and dequantization: the torch references (the CPU path) and device dispatch.

Every function takes a flat activation ``x [M, K]`` and a weight in one of the packed layouts
below, and returns ``y [M, N]`` = x @ W^T. Kernels know nothing of the engine: quantizing a
weight into these layouts is ``rtllm.quantization``'s business; only the layouts are fixed here.

Layouts (N = out_features, K = in_features):

- **W4 (int4 group-wise, asymmetric)**: ``qweight`` int32 ``[K/8, N]``; word ``(i, n)`` holds the
  codes of ``W[n, 8i .. 8i+7]``, code ``j`` in bits ``4j .. 4j+3`` (0..15). ``scales`` and
  ``zeros`` ``[K/g, N]`` (16-bit float): ``W[n, k] = (q - 8) * scales[k//g, n] + zeros[k//g, n]``.
  K-major packing lets a GEMM tile read whole words along K and contiguous runs along N.
- **W8 (int8 per-channel, symmetric)**: ``qweight`` int8 ``[N, K]``, ``scales`` fp32 ``[N]``:
  ``W[n, k] = q[n, k] * scales[n]``; since the scale is per output row, ``y = (x @ q^T) * scales``
  and an int8 -> 16-bit conversion is exact (|q| <= 127), so the dense path needs no dequantize.
- **FP8 (e4m3 per-channel weights, dynamic per-token activations)**: ``weight`` float8_e4m3fn
  ``[N, K]``, ``scales`` fp32 ``[N]``; activations are quantized per row at run time
  (``x ~= xq * sx``, ``sx = amax(|x_row|) / 448``) and ``y = (xq @ wq^T) * sx * sw`` accumulated
  in fp32 and rounded once to bf16: exactly ``torch._scaled_mm`` with row-wise scales.
- **NVFP4**: ``packed`` uint8 ``[N, K/2]`` of e2m1 codes (element ``2i`` in the low nibble, like
  ``torch.float4_e2m1fn_x2``), ``block_scales`` float8_e4m3fn ``[N, K/16]`` and a per-tensor fp32
  ``global_scale``: ``W[n, k] = e2m1(code) * block_scales[n, k//16] * global_scale``.

Dispatch: Triton on CUDA tensors (``triton_enabled``); the references here elsewhere.

``*_silu_and_mul`` (the gated MLP's fused [gate | up] projection, N = 2I): ``silu_and_mul`` of the
GEMM's output, [M, I]. Where the decode GEMV runs, the activation runs in its epilogue (one launch,
the same bits as the two kernels: rtllm.kernels.triton_quant_gemv), unless a plugin replaces
``silu_and_mul`` or RTLLM_GEMV_SILU=0; elsewhere the GEMM and then ``silu_and_mul``.
"""

from __future__ import annotations

import os

import torch

from rtllm.kernels.activation import silu_and_mul
from rtllm.kernels.dispatch import custom_kernel, triton_enabled

# At most this many rows run the fused dequantize-GEMM Triton kernels for W4 (W8 runs its tensor-core
# kernel at every M past the GEMV); larger W4 batches dequantize the weight once and run a dense
# 16-bit GEMM (compute-bound there, where cuBLAS wins). FP8 quantizes activations past this many rows.
SMALL_M = 16

# At most this many rows run the GEMV kernels (rtllm.kernels.triton_quant_gemv: no M padding; W4
# also has a swap-AB tensor-core variant there, chosen per shape by its tuned table); more rows run
# the tensor-core kernels above, whose time does not grow with M. The CUDA-core GEMV's work does:
# each row adds an FFMA and an activation load per weight to ~4.3 (W4) / ~5 (W8) instructions at
# M = 1 (sm_90 SASS: x1.45 at M = 2, x1.9 at M = 3, and spills at M = 4 for W8). M = 1 and 2 are
# measured (docs/PERF.md); the crossover against the tensor-core kernels at M = 3..16 is not.
# RTLLM_QUANT_GEMV=0 turns the GEMV off (the M = 1 W4 GEMV and tensor-core kernels of before, for
# comparisons).
_GEMV_ON = os.environ.get("RTLLM_QUANT_GEMV", "1") != "0"
W4_GEMV_MAX_M = 2 if _GEMV_ON else 0
W8_GEMV_MAX_M = 2 if _GEMV_ON else 0
# SiLU-and-mul in the GEMV's epilogue for a gate|up projection; RTLLM_GEMV_SILU=0: a separate launch
GEMV_SILU = os.environ.get("RTLLM_GEMV_SILU", "1") != "0"

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 magnitudes by 3-bit code (sign in bit 3)
NVFP4_BLOCK = 16


def _gemv_silu(x: torch.Tensor, max_m: int) -> bool:
    """Whether SiLU-and-mul runs in the epilogue of x's gate|up GEMM: the GEMV runs it (CUDA, at most
    max_m rows) and no plugin replaces silu_and_mul (whose function must then see gate|up)."""
    return GEMV_SILU and triton_enabled(x) and 0 < x.shape[0] <= max_m and custom_kernel("silu_and_mul", x) is None


# --------------------------------------------------------------------------------------------
# W4: int4 group-wise


def unpack_int4_k8(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K/8, N] -> codes int32 [K, N] (0..15)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = (qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [K/8, 8, N]
    return q.reshape(-1, qweight.shape[1])


def dequantize_w4_t(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference: W^T [K, N], computed in fp32 and rounded once to ``dtype``."""
    q = unpack_int4_k8(qweight).float()
    K, N = q.shape
    g = K // scales.shape[0]
    w = (q.view(-1, g, N) - 8.0) * scales.float().unsqueeze(1) + zeros.float().unsqueeze(1)
    return w.view(K, N).to(dtype)


def w4a16_gemm_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor) -> torch.Tensor:
    """y [M, N] = x @ W, the weight rounded to x's 16-bit dtype (as a kernel feeds its tensor
    cores), products summed in fp32, rounded once to x's dtype."""
    wt = dequantize_w4_t(qweight, scales, zeros, x.dtype if x.dtype != torch.float32 else torch.float32)
    return (x.float() @ wt.float()).to(x.dtype)


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W^T [K, N] in ``dtype``: Triton on CUDA, the reference elsewhere."""
    if triton_enabled(qweight):
        from rtllm.kernels.triton_quant_gemm import dequantize_w4_triton

        return dequantize_w4_triton(qweight, scales, zeros, dtype)
    return dequantize_w4_t(qweight, scales, zeros, dtype)


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T for the W4 layout; y in x's dtype.

    CUDA: M <= W4_GEMV_MAX_M (decode) runs the GEMV kernel on CUDA cores; M <= SMALL_M the fused
    Triton dequantize-GEMM; larger M dequantizes W^T to x's dtype (Triton) and runs one dense
    GEMM. Elsewhere: the reference."""
    if triton_enabled(x):
        from rtllm.kernels.triton_quant_gemm import dequantize_w4_triton, w4_gemv_triton, w4a16_gemm_triton

        if 0 < x.shape[0] <= W4_GEMV_MAX_M:
            from rtllm.kernels.triton_quant_gemv import w4_gemv

            return w4_gemv(x, qweight, scales, zeros)
        if x.shape[0] == 1:
            return w4_gemv_triton(x, qweight, scales, zeros)
        if x.shape[0] <= SMALL_M:
            return w4a16_gemm_triton(x, qweight, scales, zeros)
        return torch.mm(x, dequantize_w4_triton(qweight, scales, zeros, x.dtype))
    return w4a16_gemm_reference(x, qweight, scales, zeros)


def w4a16_gemm_silu_and_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(w4a16_gemm(x, ...)) for a [gate | up] weight: one launch at M <= W4_GEMV_MAX_M."""
    if _gemv_silu(x, W4_GEMV_MAX_M):
        from rtllm.kernels.triton_quant_gemv import w4_gemv

        return w4_gemv(x, qweight, scales, zeros, silu_and_mul=True)
    return silu_and_mul(w4a16_gemm(x, qweight, scales, zeros))


# --------------------------------------------------------------------------------------------
# W8: int8 per-channel weight-only


def w8a16_gemm_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [M, N] = (x @ q^T) * scales: fp32 products and sums, the per-channel scale applied to the
    fp32 sum, rounded once to x's dtype."""
    return ((x.float() @ qweight.float().t()) * scales.float()).to(x.dtype)


def w8a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (q * scales)^T; y in x's dtype.

    CUDA: M <= W8_GEMV_MAX_M runs the GEMV kernel, larger M the fused tensor-core Triton kernel
    (which never materializes a 16-bit copy of the weight: converting it for cuBLAS cost the INT8
    LM head ~1.9 ms a step at a batch of 512; the Triton kernel is 1.1-2.2x faster than that path
    at M 512-2048 and 1.7-6x at 64, H100, scripts/w8_gemm_bench.py).
    CPU: torch's int8 weight-only kernel (``aten._weight_int8pack_mm``, bf16 activations: its fast
    path) up to SMALL_M rows, the dense path above (faster there, measured on a 2-core AVX-512
    machine)."""
    if triton_enabled(x):
        from rtllm.kernels.triton_quant_gemm import w8a16_gemm_triton

        if 0 < x.shape[0] <= W8_GEMV_MAX_M:
            from rtllm.kernels.triton_quant_gemv import w8_gemv

            return w8_gemv(x, qweight, scales)
        return w8a16_gemm_triton(x, qweight, scales)
    if x.device.type == "cpu":
        xb = x.to(torch.bfloat16)
        if x.shape[0] <= SMALL_M:
            y = torch.ops.aten._weight_int8pack_mm(xb, qweight, scales.to(torch.bfloat16))
        else:
            y = torch.mm(xb, qweight.t().to(torch.bfloat16)).float().mul_(scales)
        return y.to(x.dtype)
    return w8a16_gemm_reference(x, qweight, scales)


def w8a16_gemm_silu_and_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(w8a16_gemm(x, ...)) for a [gate | up] weight: one launch at M <= W8_GEMV_MAX_M."""
    if _gemv_silu(x, W8_GEMV_MAX_M):
        from rtllm.kernels.triton_quant_gemv import w8_gemv

        return w8_gemv(x, qweight, scales, silu_and_mul=True)
    return silu_and_mul(w8a16_gemm(x, qweight, scales))


# --------------------------------------------------------------------------------------------
# FP8: e4m3 weights with per-channel scales, dynamic per-token activations


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq float8_e4m3fn [M, K], scales fp32 [M, 1]) with x ~= xq * scales.

    ``scale = amax(|row|) * fp32(1 / 448)`` (an all-zero row gets scale 1: a product with the
    rounded reciprocal, which torch's CUDA division by a Python scalar computes too, so CPU, CUDA and
    the Triton kernel agree bit for bit); values are divided by the scale in fp32 and rounded to
    nearest e4m3 (saturating at +-448)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax * (1.0 / FP8_MAX), torch.ones_like(amax))
    xq = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq, scale


def fp8_to_float(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8_e4m3fn -> ``dtype``, exact (every e4m3 value is a bf16/fp32 value).

    On the CPU this is ~2x faster than ``w.to(dtype)``: the e4m3 bit pattern, placed in the top
    bits of an fp16, is the same number times 2^-8 (subnormals and zero included)."""
    if w.device.type != "cpu":
        return w.to(dtype)
    v = w.view(torch.uint8).to(torch.int16)
    bits = ((v & 0x80) << 8) | ((v & 0x7F) << 7)
    return bits.view(torch.float16).to(dtype).mul_(256.0)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_per_token: on CUDA the Triton kernel (one launch, the same bits; the reference's
    seven took longer than the FP8 GEMM after them), elsewhere the reference."""
    if x.is_cuda:
        from rtllm.kernels.triton_fp8_quant import quantize_fp8_per_token_triton

        return quantize_fp8_per_token_triton(x)
    return quantize_fp8_per_token(x)


def fp8_scaled_mm_reference(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor,
                            scales: torch.Tensor) -> torch.Tensor:
    """The emulation of ``torch._scaled_mm`` with row-wise scales (CPU path): the e4m3 values
    multiplied in fp32 (their products are exact there), both scales applied to the fp32 sum,
    rounded once to bf16."""
    acc = fp8_to_float(xq) @ fp8_to_float(weight).t()
    return (acc * sx * scales.float()).to(torch.bfloat16)


def fp8_scaled_mm(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [M, N] bf16 = (xq * sx) @ (weight * scales)^T for an activation already quantized per token
    (xq e4m3 [M, K], sx fp32 [M, 1]): fp8_gemm's GEMM, for an input its producer quantized in its own
    kernel. CUDA: ``torch._scaled_mm`` (row-wise scales, bf16 output); elsewhere the emulation."""
    if xq.is_cuda:
        return torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=scales.view(1, -1).float(),
                                out_dtype=torch.bfloat16)
    return fp8_scaled_mm_reference(xq, sx, weight, scales)


def fp8_gemm_quantizes_input(x: torch.Tensor) -> bool:
    """Whether fp8_gemm quantizes x per token (past the weight-only rows; on the CPU always): x's
    producer may then quantize it instead and hand over (xq, sx) for fp8_scaled_mm."""
    return not (triton_enabled(x) and x.shape[0] <= SMALL_M)


def fp8_gemm_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The emulation (CPU path): quantize x per token to e4m3 and emulate ``torch._scaled_mm``
    (``out_dtype=bfloat16``); returned in x's dtype."""
    return fp8_scaled_mm_reference(*quantize_fp8_per_token(x), weight, scales).to(x.dtype)


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (weight * scales)^T with x quantized per token to e4m3; y in x's dtype.

    CUDA: ``torch._scaled_mm`` (FP8 tensor cores, sm_89+) with row-wise scales
    ``scale_a [M, 1]`` and ``scale_b [1, N]`` (fp32), which requires a bf16 output. K and N must be
    multiples of 16. Up to SMALL_M rows (decode) the weights are read by the weight-only Triton
    kernels instead (the GEMV up to W8_GEMV_MAX_M rows), activations unquantized: at M = 1 the
    per-token quantization (several small kernels per layer) and a tensor-core tile padded 64-fold
    cost more than the bytes FP8 saves (H100, Llama-3.1-8B shape: batch-1 decode 0.85x bf16 through
    ``_scaled_mm``). Elsewhere: the emulation."""
    if triton_enabled(x) and x.shape[0] <= SMALL_M:
        from rtllm.kernels.triton_quant_gemm import w8a16_gemm_triton

        if 0 < x.shape[0] <= W8_GEMV_MAX_M:
            from rtllm.kernels.triton_quant_gemv import w8_gemv

            return w8_gemv(x, weight, scales)
        return w8a16_gemm_triton(x, weight, scales)
    if x.is_cuda:
        return fp8_scaled_mm(*quantize_fp8(x), weight, scales).to(x.dtype)
    return fp8_gemm_reference(x, weight, scales)


def fp8_gemm_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(fp8_gemm(x, ...)) for a [gate | up] weight: one launch at M <= W8_GEMV_MAX_M (the
    weight-only GEMV fp8_gemm runs there)."""
    if _gemv_silu(x, W8_GEMV_MAX_M):
        from rtllm.kernels.triton_quant_gemv import w8_gemv

        return w8_gemv(x, weight, scales, silu_and_mul=True)
    return silu_and_mul(fp8_gemm(x, weight, scales))


# --------------------------------------------------------------------------------------------
# NVFP4: e2m1 values, e4m3 scales per 16, fp32 per-tensor scale


def dequantize_nvfp4_reference(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W [N, K] in ``dtype``: e2m1 value * block scale * global scale, computed in fp32."""
    N = packed.shape[0]
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=packed.device)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(N, -1)  # [N, K]
    vals = lut[codes.long()]
    K = vals.shape[1]
    bs = fp8_to_float(block_scales) * global_scale.float()
    return (vals.view(N, K // NVFP4_BLOCK, NVFP4_BLOCK) * bs.unsqueeze(-1)).view(N, K).to(dtype)


def dequantize_nvfp4(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W [N, K] in ``dtype``: the Triton kernel on CUDA, the reference elsewhere."""
    if triton_enabled(packed):
        from rtllm.kernels.triton_nvfp4 import dequantize_nvfp4_triton

        return dequantize_nvfp4_triton(packed, block_scales, global_scale, dtype)
    return dequantize_nvfp4_reference(packed, block_scales, global_scale, dtype)
