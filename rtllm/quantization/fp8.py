"""FP8 (e4m3) weights with per-output-channel scales.

``w [N, K] ~= float(wq) * scale[:, None]``, ``wq`` float8_e4m3fn and ``scale = amax(|w_row|) / 448``
(fp32), values rounded to nearest e4m3. Activations are quantized per token at run time
(rtllm.kernels.quant_gemm.quantize_fp8_per_token); the GEMM is ``torch._scaled_mm`` on the GPU.
"""

from __future__ import annotations

import torch

from rtllm.kernels.quant_gemm import FP8_DTYPE, FP8_MAX
from rtllm.quantization.scales import absmax_row_scales


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (wq float8_e4m3fn [N, K], scales fp32 [N]); an all-zero row gets scale 1."""
    wf, scale = absmax_row_scales(w, FP8_MAX)
    wq = (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return wq, scale


def dequantize_fp8(wq: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: w [N, K] = float(wq) * scales."""
    return (wq.float() * scales.float()[:, None]).to(dtype)
