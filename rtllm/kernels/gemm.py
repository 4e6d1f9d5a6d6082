"""Dense GEMM of the Linear layers: ``torch.nn.functional.linear`` (cuBLAS / oneDNN), or a kernel a
plugin registered as "linear" (rtllm.kernels.dispatch.register_kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtllm.kernels.dispatch import custom_kernel


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T (+ bias); weight [N, K]."""
    if (fn := custom_kernel("linear", x)) is not None:
        return fn(x, weight, bias)
    return F.linear(x, weight, bias)
