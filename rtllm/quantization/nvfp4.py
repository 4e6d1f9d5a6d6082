"""NVFP4 weights: e2m1 values, an e4m3 scale per 16 input channels, one fp32 scale per tensor.

For ``w [N, K]`` (K a multiple of 16):

    global_scale = amax(|w|) / (448 * 6)                      fp32
    block_scale[n, b] = e4m3(amax(|w[n, 16b:16b+16]|) / 6 / global_scale)
    code[n, k] = e2m1(w[n, k] / (block_scale[n, k // 16] * global_scale))   round to nearest even
    w[n, k] ~= e2m1_value(code) * block_scale * global_scale

Codes are 4 bits (sign, 2 exponent bits, 1 mantissa bit: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6),
two per byte along K, element 2i in the low nibble (``torch.float4_e2m1fn_x2``'s order). This is
NVIDIA's NVFP4 recipe (two-level scaling); 4.5 bits a weight.
"""

from __future__ import annotations

import torch

from rtllm.kernels.quant_gemm import E2M1_VALUES, FP8_DTYPE, FP8_MAX, NVFP4_BLOCK

E2M1_MAX = 6.0
# midpoints between consecutive e2m1 magnitudes; a tie rounds to the even code (mantissa bit 0)
_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:]))


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """fp32 values (already scaled into +-6) -> e2m1 codes uint8 (bit 3 the sign), nearest-even."""
    a = v.abs().clamp(max=E2M1_MAX)
    mid = torch.tensor(_MIDPOINTS, dtype=a.dtype, device=a.device)
    idx = torch.bucketize(a, mid)  # ties go to the lower code
    # ties whose upper neighbour is even (0.75 -> 1, 1.75 -> 2, 3.5 -> 4) go up instead
    up = torch.zeros_like(a, dtype=torch.bool)
    for i in (1, 3, 5):
        up |= a == _MIDPOINTS[i]
    idx = idx + up.to(idx.dtype)
    return (idx | ((v < 0) & (idx > 0)).to(idx.dtype) << 3).to(torch.uint8)


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K/2], block_scales float8_e4m3fn [N, K/16], global_scale fp32 [])."""
    if w.dim() != 2 or w.shape[1] % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs a 2-D weight with in_features a multiple of {NVFP4_BLOCK}, "
                         f"got shape {tuple(w.shape)}")
    N, K = w.shape
    wf = w.detach().float()
    amax = wf.abs().amax()
    gs = amax / (FP8_MAX * E2M1_MAX) if amax > 0 else torch.ones((), device=w.device)
    blocks = wf.view(N, K // NVFP4_BLOCK, NVFP4_BLOCK)
    bs = (blocks.abs().amax(-1) / E2M1_MAX / gs).clamp_(max=FP8_MAX).to(FP8_DTYPE)
    eff = bs.float() * gs
    inv = torch.where(eff > 0, 1.0 / eff, torch.zeros_like(eff))
    codes = round_to_e2m1(blocks * inv.unsqueeze(-1)).view(N, K)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.contiguous(), bs, gs.float().reshape(())
