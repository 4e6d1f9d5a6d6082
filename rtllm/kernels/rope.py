"""Rotary position embedding, neox / Hugging Face "rotate_half" layout.

cos_sin_cache: [max_position, rotary_dim] = cat(cos, sin) of the rotary frequencies.
q: [T, Hq, D], k: [T, Hkv, D]; the first rotary_dim channels of each head rotate.
"""

from __future__ import annotations

import torch

from rtllm.kernels.dispatch import triton_enabled


class RopeTables:
    """cos / signed-sin rows of one step's positions, shared by every layer:
    rotate_half(x) * sin == roll(x, rot/2) * cat(-sin, sin), so a rotation is two multiplies."""

    def __init__(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
        cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, rot/2]
        self.rotary_dim = cos.shape[-1] * 2
        self.cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)  # [T, 1, rot]
        self.sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        rd = self.rotary_dim
        xr = x[..., :rd].float()
        out = (xr * self.cos + torch.roll(xr, rd // 2, dims=-1) * self.sin).to(x.dtype)
        return torch.cat((out, x[..., rd:]), dim=-1) if x.shape[-1] > rd else out


def apply_rope_torch(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
    tables: RopeTables | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k), computed in fp32 and rounded once to the input dtype."""
    t = tables if tables is not None else RopeTables(positions, cos_sin_cache)
    return t.rotate(q), t.rotate(k)


def apply_rope(positions, q, k, cos_sin_cache):
    if triton_enabled(q):
        from rtllm.kernels import triton_rope

        return triton_rope.apply_rope_triton(positions, q, k, cos_sin_cache)
    return apply_rope_torch(positions, q, k, cos_sin_cache)
