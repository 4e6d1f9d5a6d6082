"""Triton SiLU-and-mul for the gated MLP.

x: [..., 2I] laid out as [gate | up] -> silu(gate) * up: [..., I], x's dtype. Math in fp32;
silu(gate) is rounded to x's dtype before the multiply, as the torch reference rounds it.
``silu_mul`` is that arithmetic alone, for kernels that produce gate and up themselves (the decode
GEMV's fused epilogue, rtllm.kernels.triton_quant_gemv): the same instructions give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rtllm.kernels.triton_round import COMPILED, round_to


@triton.jit
def silu_mul(g, u, DTYPE: tl.constexpr):
    """silu(g) * u in fp32, g and u fp32 holding DTYPE values; silu(g) is rounded to DTYPE first (the
    caller rounds the product to DTYPE)."""
    if COMPILED:  # libdevice's expf and an IEEE division: torch's CUDA silu, bit for bit
        act = tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
    else:  # the interpreter has no libdevice (numpy's exp: an ulp from torch's CPU silu at times)
        act = g / (1.0 + tl.exp(-g))
    return round_to(act, DTYPE) * u


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, stride_x, stride_y, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    y = silu_mul(g, u, x_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> silu(gate) * up [..., I] (new tensor, x's dtype).

    Grid: (rows, cdiv(I, BLOCK)) with BLOCK <= 1024 elements of one row per program.
    """
    two_i = x.shape[-1]
    assert two_i % 2 == 0
    inter = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and inter > 0:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, y, x2.stride(0), y.stride(0), inter, BLOCK=block, num_warps=4 if block >= 512 else 1,
            enable_fp_fusion=False,
        )
    return y.view(*x.shape[:-1], inter)
