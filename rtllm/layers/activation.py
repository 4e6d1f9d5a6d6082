"""Gated activation over a fused gate|up projection."""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import activation as act_kernels
from rtllm.layers.quant.base import QuantizedLinear


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return act_kernels.silu_and_mul(x)


def gated_up(gate_up: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(gate_up(x))``: the gated MLP's activation over its fused [gate | up] projection. A
    quantized projection with SiLU-and-mul runs the two in one launch where its GEMM can (the decode
    GEMVs, QuantizedLinear.silu_and_mul); dense projections and other activations run them in turn."""
    if isinstance(gate_up, QuantizedLinear) and type(act) is SiluAndMul:
        return gate_up.silu_and_mul(x)
    return act(gate_up(x))
