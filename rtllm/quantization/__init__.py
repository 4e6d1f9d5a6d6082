"""Weight quantization: QuantConfig, the weight formats (FP8, INT8, INT4, NVFP4), AWQ, calibration text, and
the layouts of pre-quantized HF checkpoints (docs/QUANTIZATION.md)."""

from rtllm.quantization.config import SUPPORTED_QUANT_ALGOS, QuantConfig

__all__ = ["QuantConfig", "SUPPORTED_QUANT_ALGOS"]
