"""NVFP4Linear: e2m1 weights, e4m3 scales per 16 input channels, one fp32 scale per tensor.

Hopper (sm_90) and older GPUs have no FP4 tensor cores: the weight is dequantized to the
activations' 16-bit dtype (Triton kernel on CUDA, the torch reference on the CPU) into a scratch
tensor on every call, then one dense GEMM runs. NVFP4 here saves weight memory (4.5 bits a
weight), not time; a Blackwell FP4 GEMM would take these tensors as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtllm.kernels import quant_gemm
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import QuantizedLinear, frozen, input_scale_of
from rtllm.quantization.nvfp4 import quantize_nvfp4


class NVFP4Linear(QuantizedLinear):
    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, block_scales: torch.Tensor,
                 global_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias, input_scale)
        self.packed = frozen(packed)
        self.block_scales = frozen(block_scales)
        self.global_scale = frozen(global_scale)

    @classmethod
    def from_linear(cls, layer: Linear) -> NVFP4Linear:
        packed, bs, gs = quantize_nvfp4(layer.weight)
        new = cls(layer.in_features, layer.out_features, packed, bs, gs, layer.bias, input_scale_of(layer))
        new.copy_attributes(layer)
        return new

    def dequantized_weight(self) -> torch.Tensor:
        return quant_gemm.dequantize_nvfp4_reference(self.packed, self.block_scales, self.global_scale,
                                                     torch.float32)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_cuda else torch.bfloat16  # CPU GEMMs: bf16 is the fast 16-bit type
        w = quant_gemm.dequantize_nvfp4(self.packed, self.block_scales, self.global_scale, dtype)
        return F.linear(x.to(dtype), w)
