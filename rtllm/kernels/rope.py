"""Rotary position embedding, neox / Hugging Face "rotate_half" layout.

cos_sin_cache: [max_position, rotary_dim] = cat(cos, sin) of the rotary frequencies.
q: [T, Hq, D], k: [T, Hkv, D]; the first rotary_dim channels of each head rotate.
"""

from __future__ import annotations

import torch

from rtllm.kernels.dispatch import triton_enabled


class RopeTables:
    """cos / signed-sin rows of one step's positions, shared by every layer:
    rotate_half(x) * sin == roll(x, rot/2) * cat(-sin, sin), so a rotation is two multiplies.

    Rounding is Hugging Face's (``apply_rotary_pos_emb`` on ``cos.to(x.dtype)``, ``sin.to(x.dtype)``):
    cos and sin in x's dtype, each product and the sum rounded to x's dtype (each op computed in fp32).
    In fp32 that is plain fp32 math; in bf16 it keeps the rotated q and k equal to transformers' bit
    for bit (rounding once instead changes ~1 in 4 elements by an ulp and flips near-tie tokens)."""

    def __init__(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
        cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, rot/2]
        self.rotary_dim = cos.shape[-1] * 2
        self.cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)  # [T, 1, rot]
        self.sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)
        self._by_dtype: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {torch.float32: (self.cos, self.sin)}

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        rd = self.rotary_dim
        if x.dtype not in self._by_dtype:
            self._by_dtype[x.dtype] = (self.cos.to(x.dtype), self.sin.to(x.dtype))
        cos, sin = self._by_dtype[x.dtype]
        xr = x[..., :rd]
        out = xr * cos + torch.roll(xr, rd // 2, dims=-1) * sin
        return torch.cat((out, x[..., rd:]), dim=-1) if x.shape[-1] > rd else out


def apply_rope_torch(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
    tables: RopeTables | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k) in the input dtype, rounded as transformers rounds (see RopeTables)."""
    t = tables if tables is not None else RopeTables(positions, cos_sin_cache)
    return t.rotate(q), t.rotate(k)


def apply_rope(positions, q, k, cos_sin_cache):
    if triton_enabled(q):
        from rtllm.kernels import triton_rope

        return triton_rope.apply_rope_triton(positions, q, k, cos_sin_cache)
    return apply_rope_torch(positions, q, k, cos_sin_cache)
