"""Gated activation over a fused gate|up projection."""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import activation as act_kernels
from rtllm.layers.quant.base import QuantizedLinear
from rtllm.layers.quant.fp8 import FP8Activation, takes_fp8_activation


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return act_kernels.silu_and_mul(x)


def gated_up(gate_up: nn.Module, act: nn.Module, x: torch.Tensor | FP8Activation,
             consumer: nn.Module | None = None) -> torch.Tensor | FP8Activation:
    """``act(gate_up(x))``: the gated MLP's activation over its fused [gate | up] projection. A
    quantized projection with SiLU-and-mul runs the two in one launch where its GEMM can (the decode
    GEMVs, QuantizedLinear.silu_and_mul); dense projections and other activations run them in turn.
    ``consumer``: the layer the result goes to (the down projection); an FP8Linear that quantizes its
    input per token gets an FP8Activation, SiLU-and-mul and the quantization in one kernel."""
    if type(act) is SiluAndMul and takes_fp8_activation(consumer, x):
        y = gate_up(x)
        return FP8Activation(*act_kernels.silu_and_mul_fp8(y), y.dtype)
    if isinstance(gate_up, QuantizedLinear) and type(act) is SiluAndMul:
        return gate_up.silu_and_mul(x)
    return act(gate_up(x))
