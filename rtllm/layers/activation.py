"""Gated activation over a fused gate|up projection."""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import activation as act_kernels
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import QuantizedLinear
from rtllm.layers.quant.fp8 import FP8Activation, takes_fp8_activation


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return act_kernels.silu_and_mul(x)


def _hooked(m: nn.Module) -> bool:
    """Whether m has forward hooks (a calibration observing its inputs): then it runs as a module call."""
    return bool(m._forward_pre_hooks or m._forward_hooks)


def gated_up(gate_up: nn.Module, act: nn.Module, x: torch.Tensor | FP8Activation,
             consumer: nn.Module | None = None) -> torch.Tensor | FP8Activation:
    """``act(gate_up(x))``: the gated MLP's activation over its fused [gate | up] projection. A
    projection with SiLU-and-mul runs the two in one launch where its GEMM can (the decode GEMVs:
    QuantizedLinear.silu_and_mul, Linear.silu_and_mul); other activations run them in turn.
    ``consumer``: the layer the result goes to (the down projection); an FP8Linear that quantizes its
    input per token gets an FP8Activation, SiLU-and-mul and the quantization in one kernel."""
    if type(act) is SiluAndMul and takes_fp8_activation(consumer, x):
        y = gate_up(x)
        return FP8Activation(*act_kernels.silu_and_mul_fp8(y), y.dtype)
    if type(act) is SiluAndMul and not _hooked(gate_up) and (isinstance(gate_up, QuantizedLinear) or (
            isinstance(gate_up, Linear) and type(gate_up).forward is Linear.forward)):
        return gate_up.silu_and_mul(x)
    return act(gate_up(x))
