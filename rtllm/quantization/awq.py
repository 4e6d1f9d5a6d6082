"""AWQ (activation-aware weight quantization, Lin et al. 2023): the per-input-channel scale search.

Salient input channels (large mean |x|) lose the most when their weights are rounded. AWQ scales
the weight's input channels up by ``s`` before quantizing and the activations down by ``s``
(folded into the previous norm or linear, exact in full precision):

    y = x W^T = (x / s) (W diag(s))^T ~= (x / s) Q(W diag(s))^T

with ``s = mean|x|^alpha`` normalized to geometric mean 1, alpha in [0, 1) searched on a grid
to minimize the output error ``||x Q(W diag(s))^T / s - x W^T||^2`` over calibration
activations. alpha = 0 is plain round-to-nearest, so the result never does worse than RTN on the
calibration set. Layers that read the same input (q|k|v, gate|up) share one ``s``: search with
their weights concatenated (a fused weight is exactly that).

This module is tensor math only; collecting activations and folding ``1/s`` into the model are
the model loader's job (rtllm.models.calibration).
"""

from __future__ import annotations

import torch

from rtllm.quantization.int4 import quantize_w4_groups

AWQ_GRID = 20


def fake_quant_w4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize-dequantize ``w`` [N, K] in the W4A16 format (scales and zeros rounded to bf16 as stored):
    ``dequantize_w4(*quantize_w4_asym(w))`` to the bit, on the grouped codes without the int32 codes
    and transposed scales (the searches below call it ~9,000 times for a 135M model)."""
    codes, scale, zero = quantize_w4_groups(w, group_size)
    bf16 = torch.bfloat16
    return codes.sub_(8.0).mul_(scale.to(bf16).float()).add_(zero.to(bf16).float()).reshape(w.shape)


@torch.no_grad()
def search_awq_scale(x: torch.Tensor, weight: torch.Tensor, group_size: int,
                     n_grid: int = AWQ_GRID) -> tuple[torch.Tensor, float, float]:
    """The AWQ input-channel scale for ``weight`` [N, K] given activations ``x`` [T, K].

    Returns (s fp32 [K], best error, round-to-nearest error); errors are mean squared output
    errors on ``x``. Computed in fp32."""
    xf = x.float()
    w = weight.float()
    x_mean = xf.abs().mean(0)
    ref = xf @ w.t()
    best_err, best_s, rtn_err = float("inf"), torch.ones_like(x_mean), float("nan")
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quant_w4(w * s, group_size) / s
        err = (xf @ wq.t() - ref).pow(2).mean().item()
        if i == 0:
            rtn_err = err
        if err < best_err:
            best_err, best_s = err, s
    return best_s, best_err, rtn_err


@torch.no_grad()
def search_awq_clip(x: torch.Tensor, weight: torch.Tensor, group_size: int, n_grid: int = AWQ_GRID,
                    max_shrink: float = 0.5, max_tokens: int = 64, rows_per_chunk: int = 256) -> torch.Tensor:
    """AWQ's clipping search: per (output row, group), the symmetric clip ``|w| <= ratio * max|w|``
    (ratio from 1 down to ``1 - max_shrink``) that minimizes that group's output error on ``x``.

    Returns the clipped weight [N, K] (fp32), to be quantized with ``group_size``."""
    xf = x.float()[:: max(1, x.shape[0] // max_tokens)][:max_tokens]  # [T, K]
    w = weight.float()
    N, K = w.shape
    G = K // group_size
    xg = xf.view(-1, G, group_size)  # [T, G, g]
    out = torch.empty_like(w)
    for r0 in range(0, N, rows_per_chunk):
        wc = w[r0:r0 + rows_per_chunk].view(-1, G, group_size)  # [n, G, g]
        ref = torch.einsum("tgk,ngk->tng", xg, wc)
        org_max = wc.abs().amax(-1, keepdim=True)  # [n, G, 1]
        best_err = torch.full(org_max.shape[:2], float("inf"))
        best_max = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            mx = org_max * (1 - i / n_grid)
            cur = torch.maximum(torch.minimum(wc, mx), -mx)
            q = fake_quant_w4(cur.view(-1, K), group_size).view_as(wc)
            err = (torch.einsum("tgk,ngk->tng", xg, q) - ref).pow(2).mean(0)  # [n, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), mx, best_max)
        out[r0:r0 + rows_per_chunk] = torch.maximum(torch.minimum(wc, best_max), -best_max).view(-1, K)
    return out
