"""Weight quantization: QuantConfig and the weight formats (INT4 group-wise today; FP8 / INT8 / AWQ / GPTQ later)."""

from rtllm.quantization.config import SUPPORTED_QUANT_ALGOS, QuantConfig

__all__ = ["QuantConfig", "SUPPORTED_QUANT_ALGOS"]
