"""Rotary position embedding: the cos/sin table, with the rope scaling variants of HF configs."""

from __future__ import annotations

import math

import torch
from torch import nn

from rtllm.errors import ConfigError
from rtllm.kernels.rope import RopeTables

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(rotary_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim / 2] in float32, with the config's rope scaling applied."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")


class RotaryEmbedding(nn.Module):
    """Holds cos_sin_cache [max_positions, rotary_dim] = cat(cos, sin), float32."""

    def __init__(self, rotary_dim: int, max_positions: int, base: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = rope_inv_freq(rotary_dim, base, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] rotated at ``positions`` as the attention layer rotates (and caches) its keys,
        in x's dtype (the torch reference of rtllm.kernels.rope)."""
        return RopeTables(positions, self.cos_sin_cache).rotate(x)
