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
