"""Helpers shared by the paged-attention kernels (dot precision, SM count, interpreter check) and the
other Triton kernels (SM count, programmatic dependent launch)."""

from __future__ import annotations

import functools
import os

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


@functools.lru_cache(maxsize=8)
def _pdl_on(device_index: int) -> bool:
    return (os.environ.get("RTLLM_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


def pdl_enabled(t: torch.Tensor | torch.device) -> bool:
    """Whether kernels on t's device use programmatic dependent launch (PDL: Hopper and later;
    RTLLM_PDL=0 turns it off, read once per device). A kernel launched with ``launch_pdl=True`` may
    start while the kernel before it in the stream still runs, so it calls ``gdc_wait()`` before it
    reads anything an earlier kernel wrote (or writes anything); what comes before the wait touches
    only data no kernel of the step writes: weights, and the step's inputs (positions, slots, sequence
    lengths, block tables), which are copied before the step's first kernel starts and never written by
    a kernel of the forward. A launcher that copies such an input itself (``.contiguous()``) launches
    without PDL, since the copy is the kernel right before. A kernel that calls ``gdc_launch_dependents()``
    lets the next PDL launch start once all of its programs have started. The wait covers the kernel
    launched just before alone (it ends only after its own wait): a kernel may read before its wait what
    a kernel two launches back wrote only if the kernel between them signals after its own wait (the MoE
    down GEMV reads the router's ids so: the gate/up GEMV between them waits, then signals). The
    interpreter has no grid dependency control: CPU tensors never use it."""
    dev = t if isinstance(t, torch.device) else t.device
    if dev.type != "cuda":
        return False
    return _pdl_on(dev.index if dev.index is not None else torch.cuda.current_device())
