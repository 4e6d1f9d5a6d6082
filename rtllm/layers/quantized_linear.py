"""W4A16 linear layers: INT4 group-wise weights with 16-bit activations, on the CPU.

Applied after the checkpoint is loaded: ``quantize_linear_layers(model, quant_config)`` replaces
every ``Linear`` (and its fused subclasses ``MergedLinear`` / ``QKVLinear``) by a
``W4A16Linear``. The fused weight is quantized as a whole: groups run along the input dimension
and rows are independent, so a fused q|k|v or gate|up matrix quantizes exactly like its parts.
The new layer keeps the plain attributes of the old one (``q_size``, ``output_sizes``...), so
model code never knows.

Left in the model dtype: embeddings, norms and the LM head. The LM head is often tied to the
embedding table (one tensor serves both, SmolLM2 included), which is read by row lookups and must
stay dense; an untied head is the model's most accuracy-sensitive matmul. (Quantizing a separate
INT4 copy of the head would cut decode bytes further; not done yet.)

Kernel: ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Measured on this machine (torch 2.13,
AVX-512 BF16): it is vectorized for bf16 activations only; fp32 and fp16 run ~30x slower than
bf16 F.linear. So the GEMM always runs with bf16 activations (the "A16"): other dtypes are cast
to bf16 and the result back, and scales/zeros are stored in bf16.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from rtllm.errors import ConfigError
from rtllm.layers.linear import Linear
from rtllm.quantization.config import W4A16, W4A16_GROUP_SIZES, QuantConfig
from rtllm.quantization.int4 import (
    CPU_PACK_N_MULTIPLE,
    dequantize_packed_cpu_t,
    pack_w4_cpu,
    quantize_w4_asym,
    unpack_w4_cpu,
)

logger = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16

# Batches of at least this many tokens dequantize the weight to bf16 once and run one dense
# GEMM instead of the int4 kernel. Measured (2-core AVX-512 EPYC, bf16, group 32, 30 distinct
# matrices rotated so none sits in cache; ms per matrix, int4 kernel / dequant+mm / bf16 F.linear):
#   3072x576:  M=1 0.054/0.75/0.22   M=16 0.36/0.88/0.37   M=64 1.47/2.29/0.90   M=128 2.89/2.83/1.45
#              M=256 5.83/4.10/2.64  M=1024 23.5/13.9/12.2
#   576x1536:  M=1 0.033/0.98/0.13   M=64 0.68/0.72/0.40   M=128 1.34/0.97/0.64  M=256 2.71/1.50/1.14
#   960x576:   M=1 0.022/0.65/0.10   M=64 0.50/1.27/0.41   M=128 0.94/1.28/0.58  M=256 1.69/1.50/0.91
# The kernel runs at ~160 GFLOP/s whatever M (it beats bf16 F.linear up to M~16, 4x at M=1);
# the dense path pays ~0.3-0.9 ms of dequantization per matrix and then runs at bf16 GEMM
# speed (~350 GFLOP/s). They cross between M=128 and M=256.
DEQUANT_MIN_TOKENS = 192

_tls = threading.local()  # per-thread scratch for the dense path (engines run one forward at a time per thread)


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer: fresh multi-MB allocations page-fault on every call and cost more than the work."""
    bufs = _tls.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        bufs[dtype] = buf
    return buf[:numel]


def choose_group_size(in_features: int, requested: int) -> int | None:
    """The largest supported group <= ``requested`` that divides ``in_features`` (None: none does)."""
    for g in sorted(W4A16_GROUP_SIZES, reverse=True):
        if g <= requested and in_features % g == 0:
            return g
    return None


class W4A16Linear(nn.Module):
    """y = x W^T (+ b) with W stored as INT4 codes and per-group bf16 scales and zeros.

    ``packed``: uint8 [N, K/2] in the CPU kernel's layout; ``scales_and_zeros``: bf16 [K/g, N, 2]
    with W[n, k] = (q[n, k] - 8) * s[k//g, n, 0] + s[k//g, n, 1]; ``bias`` in the model dtype.
    They are parameters (requires_grad=False) so the model's weight bytes count them.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, packed: torch.Tensor,
                 scales_and_zeros: torch.Tensor, bias: torch.Tensor | None, fast_dequant: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.scales_and_zeros = nn.Parameter(scales_and_zeros, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # whether the dense path's unpacking knows the packed layout (checked against the codes at pack time)
        self.fast_dequant = fast_dequant

    @classmethod
    def from_linear(cls, layer: Linear, group_size: int) -> W4A16Linear:
        """Quantize a loaded Linear (or fused subclass); copies its plain attributes (q_size, ...)."""
        w = layer.weight
        if w.device.type != "cpu":
            raise ConfigError(f"QuantConfig.quant_algo='{W4A16}': W4A16 runs on CPU only for now "
                              f"(weights are on {w.device})")
        codes, scales, zeros = quantize_w4_asym(w, group_size)
        packed, sz = pack_w4_cpu(codes, scales, zeros, KERNEL_DTYPE)
        unpacked = unpack_w4_cpu(packed, *w.shape)
        fast = unpacked is not None and torch.equal(unpacked, codes.to(torch.uint8))
        new = cls(layer.in_features, layer.out_features, group_size, packed, sz, layer.bias, fast)
        for k, v in vars(layer).items():
            if not k.startswith("_") and k != "training" and not hasattr(new, k):
                setattr(new, k, v)
        return new

    def dequantized_weight(self) -> torch.Tensor | None:
        """W [N, K] in bf16 as the dense path computes it (None when the layout is unknown)."""
        if not self.fast_dequant:
            return None
        K, N = self.in_features, self.out_features
        out = torch.empty(K, N, dtype=KERNEL_DTYPE)
        u8 = torch.empty(K * N // 2, dtype=torch.uint8)
        return dequantize_packed_cpu_t(self.packed, self.scales_and_zeros, self.group_size, out, u8).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        lead = x.shape[:-1]
        xa = x.reshape(-1, K).to(KERNEL_DTYPE).contiguous()
        if xa.shape[0] >= DEQUANT_MIN_TOKENS and self.fast_dequant:
            wt = dequantize_packed_cpu_t(self.packed, self.scales_and_zeros, self.group_size,
                                         _scratch(K * N, KERNEL_DTYPE).view(K, N),
                                         _scratch(K * N // 2, torch.uint8))
            y = torch.mm(xa, wt)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xa, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*lead, N)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, fast_dequant={self.fast_dequant}")


@dataclass
class QuantizeReport:
    """What quantize_linear_layers did: layer name -> group size used, and the layers it left dense (why)."""

    quantized: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def quantize_linear_layers(model: nn.Module, quant_config: QuantConfig) -> QuantizeReport:
    """Replace the model's loaded Linear layers by quantized ones, in place (after weights are loaded).

    A layer whose in_features the requested group does not divide uses the largest supported
    group that does; one with no such group, or with out_features not a multiple of 16 (the
    CPU packer's rule), stays dense and is reported in ``skipped``."""
    report = QuantizeReport()
    if quant_config is None or not quant_config.enabled:
        return report
    if quant_config.quant_algo != W4A16:  # pragma: no cover - QuantConfig admits only W4A16 today
        raise ConfigError(f"QuantConfig.quant_algo={quant_config.quant_algo!r}: no layer implementation")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    for name, layer in targets:
        quant_config.check_device(layer.weight.device)
        g = choose_group_size(layer.in_features, quant_config.group_size)
        if g is None:
            report.skipped[name] = f"in_features={layer.in_features} is not a multiple of {min(W4A16_GROUP_SIZES)}"
            continue
        if layer.out_features % CPU_PACK_N_MULTIPLE:
            report.skipped[name] = f"out_features={layer.out_features} is not a multiple of {CPU_PACK_N_MULTIPLE}"
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, W4A16Linear.from_linear(layer, g))
        report.quantized[name] = g
    return report
