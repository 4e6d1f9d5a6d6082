"""RMSNorm layer over the fused kernel; its output quantized to FP8 in the same kernel for an FP8
linear layer that takes it (rtllm.layers.quant.fp8)."""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import norm as norm_kernels
from rtllm.layers.quant.fp8 import FP8Activation, takes_fp8_activation


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, consumer: nn.Module | None = None
    ) -> torch.Tensor | FP8Activation | tuple[torch.Tensor | FP8Activation, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual). ``consumer``: the
        layer the norm's output goes to; an FP8Linear that quantizes its input per token gets the
        norm as an FP8Activation, normalized and quantized in one kernel."""
        if takes_fp8_activation(consumer, x):
            q, scale, summed = norm_kernels.rms_norm_fp8(x, residual, self.weight, self.eps)
            out = FP8Activation(q, scale, torch.promote_types(x.dtype, self.weight.dtype))
            return out if residual is None else (out, summed)
        if residual is None:
            return norm_kernels.rms_norm(x, self.weight, self.eps)
        return norm_kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
