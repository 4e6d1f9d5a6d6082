"""A custom RMSNorm kernel that counts its calls (a stand-in for a faster kernel of your own).

Registered for every device under rtllm's kernel names ``rms_norm`` and ``fused_add_rms_norm``
(rtllm.kernels.dispatch.KERNEL_SIGNATURES): every RMSNorm layer of every model then runs it.
``CALLS`` counts calls in this process; with ``RTLLM_EXAMPLE_COUNT_FILE`` set, the counts are
written there as JSON when the process exits (how a test sees an engine worker's counts).
"""

from __future__ import annotations

import atexit
import json
import os
from collections import Counter

import torch

from rtllm.kernels.dispatch import register_kernel

CALLS: Counter[str] = Counter()


def counting_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    CALLS["rms_norm"] += 1
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def counting_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS["fused_add_rms_norm"] += 1
    s = x + residual
    xf = s.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype), s


def _dump_counts() -> None:
    path = os.environ.get("RTLLM_EXAMPLE_COUNT_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"pid": os.getpid(), **CALLS}, f)


def register() -> None:
    register_kernel("rms_norm", counting_rms_norm, device="any")
    register_kernel("fused_add_rms_norm", counting_fused_add_rms_norm, device="any")
    if os.environ.get("RTLLM_EXAMPLE_COUNT_FILE"):
        atexit.register(_dump_counts)
