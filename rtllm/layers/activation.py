"""Gated activation over a fused gate|up projection."""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import activation as act_kernels


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return act_kernels.silu_and_mul(x)
