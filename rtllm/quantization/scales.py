"""Per-output-channel absmax scales, shared by the FP8 and INT8 weight formats."""

from __future__ import annotations

import torch


def absmax_row_scales(w: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w as fp32 [N, K], scales fp32 [N]) with ``scale = amax(|row|) / qmax``; an all-zero row gets
    scale 1. Raises ValueError for anything but a 2-D weight."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1)
    return wf, torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
