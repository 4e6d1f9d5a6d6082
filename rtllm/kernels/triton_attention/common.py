"""Helpers shared by the paged-attention kernels (dot precision, SM count, interpreter check)."""

from __future__ import annotations

import functools

import torch
import triton.language as tl

LOG2E = 1.4426950408889634
#: Triton dtype of each torch dtype a dot may run in (passed as a constexpr)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# --------------------------------------------------------------------------------------------
# helpers


def interpreting(t: torch.Tensor) -> bool:
    """CPU tensors can only reach a Triton kernel under TRITON_INTERPRET=1."""
    return t.device.type != "cuda"


def dot_config(t: torch.Tensor, cache_dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC) for a kernel reading a cache of ``cache_dtype``.

    The interpreter gets bf16 arithmetic wrong, so there bf16 tiles are upcast to fp32 right
    after loading. fp32 caches use IEEE dots so results match the fp32 reference.
    """
    upcast = interpreting(t) and cache_dtype == torch.bfloat16
    prec = "ieee" if (cache_dtype == torch.float32 or upcast) else "tf32"
    return upcast, prec


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    if t.is_cuda:
        return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 132  # H100: the target machine; only shapes the split heuristic on CPU
