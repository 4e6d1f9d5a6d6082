"""Quantized linear layers: replace a loaded model's Linear layers by packed ones, in place.

Applied after the checkpoint is loaded: ``quantize_linear_layers(model, quant_config)`` replaces
every ``Linear`` (and its fused subclasses ``MergedLinear`` / ``QKVLinear``) by the layer of the
configured format (rtllm.layers.quant): ``FP8Linear``, ``W8A16Linear``, ``W4A16Linear`` (W4A16
and W4A16_AWQ) or ``NVFP4Linear``. A fused weight is quantized as a whole: scales are per output
row (FP8, INT8) or per (row, group along the input) (INT4, NVFP4's blocks), so a fused q|k|v or
gate|up matrix quantizes exactly like its parts. (NVFP4's one per-tensor scale is the exception:
shared by the fused parts, which only moves where the e4m3 block scales fall.) The new layer
keeps the plain attributes of the old one (``q_size``, ``output_sizes``...), so model code
never knows.

Left in the model dtype: embeddings, norms and the LM head. The LM head is often tied to the
embedding table (one tensor serves both, SmolLM2 included), which is read by row lookups and must
stay dense; an untied head is the model's most accuracy-sensitive matmul.

W4A16_AWQ expects the model already calibrated (rtllm.models.calibration.apply_awq): weights
scaled by AWQ's per-input-channel ``s`` and ``1/s`` folded into the previous op, or left on the
layer as ``awq_input_scale`` where it could not be folded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from rtllm.errors import ConfigError
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import QuantizedLinear
from rtllm.layers.quant.fp8 import FP8Linear
from rtllm.layers.quant.int4 import DEQUANT_MIN_TOKENS, KERNEL_DTYPE, W4A16Linear, w4_backend
from rtllm.layers.quant.int8 import W8A16Linear
from rtllm.layers.quant.nvfp4 import NVFP4Linear
from rtllm.quantization.config import (
    FP8,
    NVFP4,
    W4A16,
    W4A16_AWQ,
    W4A16_GROUP_SIZES,
    W8A16,
    QuantConfig,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEQUANT_MIN_TOKENS", "KERNEL_DTYPE", "FP8Linear", "NVFP4Linear", "QuantizeReport", "QuantizedLinear",
    "W4A16Linear", "W8A16Linear", "choose_group_size", "quantize_linear_layers",
]


def choose_group_size(in_features: int, requested: int) -> int | None:
    """The largest supported INT4 group <= ``requested`` that divides ``in_features`` (None: none does)."""
    for g in sorted(W4A16_GROUP_SIZES, reverse=True):
        if g <= requested and in_features % g == 0:
            return g
    return None


@dataclass
class QuantizeReport:
    """What quantize_linear_layers did: layer name -> group size used (0: per-channel), and the
    layers it left dense (why)."""

    quantized: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _quantize_one(layer: Linear, qc: QuantConfig) -> tuple[nn.Module | None, int, str]:
    """(new layer or None when it stays dense, group size used, why it stayed dense)."""
    algo = qc.quant_algo
    K, N = layer.in_features, layer.out_features
    if algo in (W4A16, W4A16_AWQ):
        g = qc.resolve_group_size(K)  # an explicit group that does not divide K raises ConfigError
        if g is None:
            return None, 0, f"in_features={K} is not a multiple of {min(W4A16_GROUP_SIZES)}"
        why = W4A16Linear.supports(N, layer.weight.device)
        return (None, 0, why) if why else (W4A16Linear.from_linear(layer, g), g, "")
    if algo == NVFP4:
        g = qc.resolve_group_size(K)
        if g is None:
            return None, 0, f"in_features={K} is not a multiple of the NVFP4 block (16)"
        return NVFP4Linear.from_linear(layer), g, ""
    if algo == W8A16:
        return W8A16Linear.from_linear(layer), 0, ""
    if algo == FP8:
        why = FP8Linear.supports(K, N)
        return (None, 0, why) if why else (FP8Linear.from_linear(layer), 0, "")
    raise ConfigError(f"QuantConfig.quant_algo={algo!r}: no layer implementation")  # pragma: no cover


def quantize_linear_layers(model: nn.Module, quant_config: QuantConfig | None) -> QuantizeReport:
    """Replace the model's loaded Linear layers by quantized ones, in place (after weights are loaded).

    A layer the format cannot hold (e.g. INT4 with no group dividing in_features under
    group_size=None, or out_features not a multiple of 16 for the CPU int4 packer) stays dense
    and is reported in ``skipped``; an explicit group_size that does not divide a layer's
    in_features raises ConfigError before any layer is replaced."""
    report = QuantizeReport()
    if quant_config is None or not quant_config.enabled:
        return report
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    for name, layer in targets:  # validate everything first: no half-quantized model on error
        quant_config.check_device(layer.weight.device)
        if layer.weight.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"QuantConfig.quant_algo={quant_config.quant_algo!r}: runs on CPU / CUDA only "
                              f"(layer {name} is on {layer.weight.device})")
        if quant_config.grouped:
            try:
                quant_config.resolve_group_size(layer.in_features)
            except ConfigError as e:
                raise ConfigError(f"{e} [layer {name}]") from None
        if quant_config.quant_algo in (W4A16, W4A16_AWQ):
            w4_backend(layer.weight.device)
    for name, layer in targets:
        new, g, why = _quantize_one(layer, quant_config)
        if new is None:
            report.skipped[name] = why
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        report.quantized[name] = g
    return report
