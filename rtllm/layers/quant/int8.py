"""W8A16Linear: INT8 weight-only, per-output-channel symmetric scales (rtllm.quantization.int8).

``qweight`` int8 [N, K] and ``scales`` fp32 [N]; one layout for both devices. GEMM:
rtllm.kernels.quant_gemm.w8a16_gemm (CUDA: the Triton kernel up to 16 rows, an exact int8 -> 16-bit
conversion + dense GEMM above; CPU: torch's ``_weight_int8pack_mm`` up to 16 rows, the dense path
above).
"""

from __future__ import annotations

import torch

from rtllm.kernels import quant_gemm
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import QuantizedLinear, frozen, input_scale_of
from rtllm.quantization.int8 import dequantize_w8, quantize_w8_per_channel


class W8A16Linear(QuantizedLinear):
    def __init__(self, in_features: int, out_features: int, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None, input_scale: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias, input_scale)
        self.qweight = frozen(qweight)
        self.scales = frozen(scales)

    @classmethod
    def supports(cls, out_features: int, device: torch.device) -> str | None:
        return None

    @classmethod
    def from_linear(cls, layer: Linear) -> W8A16Linear:
        q, s = quantize_w8_per_channel(layer.weight)
        new = cls(layer.in_features, layer.out_features, q, s, layer.bias, input_scale_of(layer))
        new.copy_attributes(layer)
        return new

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_w8(self.qweight, self.scales)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return quant_gemm.w8a16_gemm(x, self.qweight, self.scales)

    def _matmul_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return quant_gemm.w8a16_gemm_silu_and_mul(x, self.qweight, self.scales)
