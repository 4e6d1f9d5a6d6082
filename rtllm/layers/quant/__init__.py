"""Quantized linear layers, one module per weight format, and the INT8 embedding (see
rtllm.layers.quantized_linear)."""

from rtllm.layers.quant.base import QuantizedLinear
from rtllm.layers.quant.fp8 import FP8Linear
from rtllm.layers.quant.int4 import W4A16Linear
from rtllm.layers.quant.int8 import W8A16Linear
from rtllm.layers.quant.nvfp4 import NVFP4Linear
from rtllm.layers.quant.vocab import Int8Embedding

__all__ = ["FP8Linear", "Int8Embedding", "NVFP4Linear", "QuantizedLinear", "W4A16Linear", "W8A16Linear"]
