"""RMSNorm layer over the fused kernel."""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import norm as norm_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if residual is None:
            return norm_kernels.rms_norm(x, self.weight, self.eps)
        return norm_kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
