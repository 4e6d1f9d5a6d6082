"""SiLU-and-mul: the gated MLP's activation on a fused gate|up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtllm.kernels.dispatch import custom_kernel, triton_enabled


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] laid out as [gate | up] -> silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x):
    if (fn := custom_kernel("silu_and_mul", x)) is not None:
        return fn(x)
    if triton_enabled(x):
        from rtllm.kernels import triton_activation

        return triton_activation.silu_and_mul_triton(x)
    return silu_and_mul_torch(x)


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2I] -> quantize_fp8_per_token(silu_and_mul(x)): (e4m3 [M, I], fp32 scales [M, 1]), the
    input of an FP8 down projection. One Triton kernel on CUDA (I <= 16K, no plugin silu_and_mul; the
    same bits), else the activation and then the quantization."""
    from rtllm.kernels.quant_gemm import quantize_fp8

    if triton_enabled(x) and custom_kernel("silu_and_mul", x) is None:
        from rtllm.kernels import triton_fp8_quant as fq

        if x.shape[-1] // 2 <= fq.MAX_FUSED_ROW:
            return fq.silu_and_mul_fp8_quant_triton(x)
    return quantize_fp8(silu_and_mul(x))
