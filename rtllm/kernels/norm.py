"""RMSNorm, optionally fused with the residual add."""

from __future__ import annotations

import torch

from rtllm.kernels.dispatch import custom_kernel, triton_enabled


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    s = x + residual
    return rms_norm_torch(s, weight, eps), s


def rms_norm(x, weight, eps):
    if (fn := custom_kernel("rms_norm", x)) is not None:
        return fn(x, weight, eps)
    if triton_enabled(x):
        from rtllm.kernels import triton_norm

        return triton_norm.rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x [M, H] (of x + residual) quantized per token for an FP8 linear layer: (e4m3 [M, H],
    fp32 scales [M, 1], x + residual or None), the value quantize_fp8_per_token gives for the norm's
    output. One Triton kernel on CUDA (one dtype, H <= 16K, no plugin norm; the same bits), else the
    norm and then the quantization."""
    from rtllm.kernels.quant_gemm import quantize_fp8

    name = "rms_norm" if residual is None else "fused_add_rms_norm"
    same = weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
    if triton_enabled(x) and same and x.dim() == 2 and custom_kernel(name, x) is None:
        from rtllm.kernels import triton_fp8_quant as fq

        if x.shape[-1] <= fq.MAX_FUSED_ROW:
            return fq.rms_norm_fp8_quant_triton(x, residual, weight, eps)
    if residual is None:
        return (*quantize_fp8(rms_norm(x, weight, eps)), None)
    y, s = fused_add_rms_norm(x, residual, weight, eps)
    return (*quantize_fp8(y), s)


def fused_add_rms_norm(x, residual, weight, eps):
    if (fn := custom_kernel("fused_add_rms_norm", x)) is not None:
        return fn(x, residual, weight, eps)
    if triton_enabled(x):
        from rtllm.kernels import triton_norm

        return triton_norm.fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_torch(x, residual, weight, eps)
