"""Rotary position embedding, neox / Hugging Face "rotate_half" layout.

cos_sin_cache: [max_position, rotary_dim] = cat(cos, sin) of the rotary frequencies.
q: [T, Hq, D], k: [T, Hkv, D]; the first rotary_dim channels of each head rotate.
"""

from __future__ import annotations

import torch

from rtllm.kernels.dispatch import triton_enabled


def apply_rope_torch(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, rot/2]
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        rd = cos.shape[-1] * 2
        xr, xp = x[..., :rd].float(), x[..., rd:]
        x1, x2 = xr.chunk(2, dim=-1)
        o = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        return torch.cat((o, xp), dim=-1) if xp.shape[-1] else o

    return rot(q), rot(k)


def apply_rope(positions, q, k, cos_sin_cache):
    if triton_enabled(q):
        from rtllm.kernels import triton_rope

        return triton_rope.apply_rope_triton(positions, q, k, cos_sin_cache)
    return apply_rope_torch(positions, q, k, cos_sin_cache)
