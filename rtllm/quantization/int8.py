"""INT8 weight-only (W8A16): per-output-channel symmetric quantization.

``w [N, K] ~= q * scale[:, None]`` with ``q`` int8 in -127..127 and ``scale = amax(|w_row|) / 127``
(fp32). Rounding is to nearest; an all-zero row gets scale 1. Rows are independent, so a fused
q|k|v or gate|up matrix quantizes exactly like its parts.
"""

from __future__ import annotations

import torch

from rtllm.quantization.scales import absmax_row_scales

INT8_MAX = 127


def quantize_w8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scales fp32 [N]), computed in fp32."""
    wf, scale = absmax_row_scales(w, INT8_MAX)
    q = torch.round(wf / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_w8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: w [N, K] = q * scales (fp32, then ``dtype``)."""
    return (q.float() * scales.float()[:, None]).to(dtype)
