"""FP8Linear: e4m3 weights with per-output-channel scales, activations quantized per token at run time.

``weight`` float8_e4m3fn [N, K] and ``weight_scale`` fp32 [N] (rtllm.quantization.fp8). GEMM:
rtllm.kernels.quant_gemm.fp8_gemm: ``torch._scaled_mm`` on CUDA (row-wise scales, bf16 output),
its exact-semantics emulation on the CPU (slow: an emulation for correctness, not a fast path).
``torch._scaled_mm`` needs K and N multiples of 16; other layers stay dense (on every device,
so a model quantizes the same way everywhere).

Where the layer would quantize its input per token (past the weight-only decode rows), the layer
that produces the input may do it in its own kernel instead (RMSNorm, SiLU-and-mul: told their
consumer, they ask ``takes_fp8_activation``) and hand over an ``FP8Activation``, which the layer's
forward takes as it is: the 16-bit activation is then never written and read back by a separate
quantization launch. The value is the same bits either way. RTLLM_FP8_FUSED_QUANT=0: never.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from rtllm.kernels import activation as act_kernels
from rtllm.kernels import quant_gemm
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import QuantizedLinear, frozen, input_scale_of
from rtllm.quantization.fp8 import dequantize_fp8, quantize_fp8_per_channel

FP8_ALIGN = 16
FUSE_INPUT_QUANT = os.environ.get("RTLLM_FP8_FUSED_QUANT", "1") != "0"


class FP8Activation(NamedTuple):
    """An FP8Linear's input [M, K] quantized per token by its producer: e4m3 values, fp32 scales
    [M, 1], and the dtype of the tensor it stands for (the layer's output dtype)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def takes_fp8_activation(layer: torch.nn.Module | None, x: torch.Tensor | FP8Activation) -> bool:
    """Whether the producer of ``layer``'s input should hand it an FP8Activation: ``layer`` is an
    FP8Linear that would quantize an input of ``x``'s rows and device per token (no AWQ input scale
    applied first). ``x``: the producer's own input (the same rows and device)."""
    if not FUSE_INPUT_QUANT or not isinstance(layer, FP8Linear) or layer.input_scale is not None:
        return False
    return quant_gemm.fp8_gemm_quantizes_input(x.q if isinstance(x, FP8Activation) else x)


class FP8Linear(QuantizedLinear):
    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, input_scale: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias, input_scale)
        self.weight = frozen(weight)
        self.weight_scale = frozen(weight_scale)

    @classmethod
    def supports(cls, in_features: int, out_features: int) -> str | None:
        if in_features % FP8_ALIGN or out_features % FP8_ALIGN:
            return (f"in_features={in_features} / out_features={out_features}: FP8 GEMMs need multiples of "
                    f"{FP8_ALIGN}")
        return None

    @classmethod
    def from_linear(cls, layer: Linear) -> FP8Linear:
        wq, s = quantize_fp8_per_channel(layer.weight)
        new = cls(layer.in_features, layer.out_features, wq, s, layer.bias, input_scale_of(layer))
        new.copy_attributes(layer)
        return new

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return quant_gemm.fp8_gemm(x, self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor | FP8Activation) -> torch.Tensor:
        if not isinstance(x, FP8Activation):
            return super().forward(x)
        return self._output(quant_gemm.fp8_scaled_mm(x.q, x.scale, self.weight, self.weight_scale), x.dtype)

    def silu_and_mul(self, x: torch.Tensor | FP8Activation) -> torch.Tensor:
        if isinstance(x, FP8Activation):  # past the decode GEMV's rows: the activation after the GEMM
            return act_kernels.silu_and_mul(self(x))
        return super().silu_and_mul(x)

    def _matmul_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return quant_gemm.fp8_gemm_silu_and_mul(x, self.weight, self.weight_scale)
