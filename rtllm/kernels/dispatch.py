"""Device dispatch shared by all kernels."""

from __future__ import annotations

import os

import torch

_force_reference = os.environ.get("RTLLM_KERNELS", "").lower() == "reference"


def use_reference(flag: bool = True) -> None:
    """Force (or stop forcing) the torch reference of every kernel."""
    global _force_reference
    _force_reference = flag


def triton_enabled(t: torch.Tensor) -> bool:
    """True when the Triton version of a kernel should run on tensor ``t``.

    Triton runs on CUDA tensors. On CPU it runs only under TRITON_INTERPRET=1, and only
    when a test asks for it explicitly by calling the ``*_triton`` function itself.
    """
    return t.is_cuda and not _force_reference
