"""Triton RMSNorm and fused residual-add + RMSNorm.

Semantics are those of :mod:`rtllm.kernels.norm` (Llama/HF RMSNorm):
``y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with the statistics in fp32, the
normalized value rounded to x's dtype before the weight multiply, and the output dtype
``promote_types(x.dtype, weight.dtype)``. x is [..., H] (the last dim contiguous after a
reshape); weight is [H].

One program normalizes one row held entirely in registers (one read, one write per tensor). On Hopper
the launch is a programmatic dependent one (rtllm.kernels.triton_attention.common.pdl_enabled): the
norm's weight is loaded before the wait for the kernel before, x and the residual after it.
``rms_norm_row`` is that arithmetic, shared with the kernel that also quantizes the row to FP8
(rtllm.kernels.triton_fp8_quant): the same instructions give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rtllm.kernels.triton_attention.common import pdl_enabled
from rtllm.kernels.triton_round import round_to


@triton.jit
def norm_weight(w_ptr, H: tl.constexpr, BLOCK: tl.constexpr):
    """The norm's weight row in fp32 (loaded first: it does not depend on the kernel before)."""
    offs = tl.arange(0, BLOCK)
    return tl.load(w_ptr + offs, mask=offs < H, other=0.0).to(tl.float32)


@triton.jit
def rms_norm_row(x_ptr, r_ptr, w, s_ptr, row, stride_x, stride_r, stride_s, eps, H: tl.constexpr,
                 BLOCK: tl.constexpr, ADD: tl.constexpr):  # fmt: skip
    """(weight w (norm_weight's) * normalized row ``row`` in fp32, to be rounded to the output dtype by the
    caller; the offsets; their mask). With ADD, x + residual is stored to s first and normalized."""
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        # the sum is rounded to its storage dtype first, and the norm is taken of that value
        x = round_to(x + r, s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + offs, x, mask=mask)
    var = tl.sum(x * x, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    if ADD:
        xn = round_to(x * rstd, s_ptr.dtype.element_ty)
    else:
        xn = round_to(x * rstd, x_ptr.dtype.element_ty)
    return xn * w, offs, mask


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    s_ptr,
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    eps,
    H: tl.constexpr,
    BLOCK: tl.constexpr,
    ADD: tl.constexpr,
    PDL: tl.constexpr,
):
    w = norm_weight(w_ptr, H, BLOCK)  # requested before the wait, off the critical path
    if PDL:  # launched while the previous kernel runs: the next may start too; x is read after it ends
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    y, offs, mask = rms_norm_row(x_ptr, r_ptr, w, s_ptr, row, stride_x, stride_r, stride_s, eps, H, BLOCK, ADD)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def norm_warps(block: int) -> int:
    return 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    H = x.shape[-1]
    assert weight.shape == (H,)
    x2 = _rows(x)
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is not None:
        assert residual.shape == x.shape
        r2 = _rows(residual)
        s = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        r2 = s = x2  # unused
    R = x2.shape[0]
    if R > 0:
        block = triton.next_power_of_2(H)
        # the weight is read before the PDL wait: a copy made just now (a kernel before this one) must not be
        pdl = pdl_enabled(x2) and w is weight
        _rms_norm_kernel[(R,)](
            x2, r2, w, y, s, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), eps,
            H=H, BLOCK=block, ADD=residual is not None, PDL=pdl, num_warps=norm_warps(block),
            enable_fp_fusion=False, launch_pdl=pdl,
        )  # fmt: skip
    return y.view(x.shape), s.view(x.shape)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., H] with weight [H]; returns a new tensor. Grid: one program per row."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) from one pass over x and residual.

    Both results are new tensors (inputs untouched). Grid: one program per row.
    """
    return _launch(x, residual, weight, eps)
