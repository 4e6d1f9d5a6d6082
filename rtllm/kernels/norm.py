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


def fused_add_rms_norm(x, residual, weight, eps):
    if (fn := custom_kernel("fused_add_rms_norm", x)) is not None:
        return fn(x, residual, weight, eps)
    if triton_enabled(x):
        from rtllm.kernels import triton_norm

        return triton_norm.fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_torch(x, residual, weight, eps)
