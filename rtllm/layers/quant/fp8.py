"""FP8Linear: e4m3 weights with per-output-channel scales, activations quantized per token at run time.

``weight`` float8_e4m3fn [N, K] and ``weight_scale`` fp32 [N] (rtllm.quantization.fp8). GEMM:
rtllm.kernels.quant_gemm.fp8_gemm: ``torch._scaled_mm`` on CUDA (row-wise scales, bf16 output),
its exact-semantics emulation on the CPU (slow: an emulation for correctness, not a fast path).
``torch._scaled_mm`` needs K and N multiples of 16; other layers stay dense (on every device,
so a model quantizes the same way everywhere).
"""

from __future__ import annotations

import torch

from rtllm.kernels import quant_gemm
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import QuantizedLinear, frozen, input_scale_of
from rtllm.quantization.fp8 import dequantize_fp8, quantize_fp8_per_channel

FP8_ALIGN = 16


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

    def _matmul_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return quant_gemm.fp8_gemm_silu_and_mul(x, self.weight, self.weight_scale)
