"""Triton NVFP4 dequantization: e2m1 codes x e4m3 block scales (16 along K) x fp32 tensor scale -> W.

Semantics are :func:`rtllm.kernels.quant_gemm.dequantize_nvfp4_reference`. Hopper (sm_90) has no
FP4 tensor cores, so NVFP4 weights are expanded to 16 bits before a dense GEMM: the format saves
memory (4.5 bits a weight), not time, on an H100.

Both 8-bit formats are decoded with integer ops from their bytes (scales passed as uint8), which
runs the same on every GPU and under the interpreter (which has no fp8 types):
e4m3 ``s eeee mmm`` = (1 + m/8) 2^(e-7), or m/8 * 2^-6 when e = 0; e2m1 ``s ee m`` =
(1 + m/2) 2^(e-1), or m/2 when e = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NVFP4_BLOCK = 16


@triton.jit
def _e4m3_to_f32(b):
    b = b.to(tl.int32)
    e = (b >> 3) & 0xF
    m = (b & 7).to(tl.float32)
    normal = (1.0 + m * 0.125) * tl.exp2((e - 7).to(tl.float32))
    mag = tl.where(e == 0, m * 0.001953125, normal)  # m/8 * 2^-6 = m * 2^-9
    return tl.where((b & 0x80) != 0, -mag, mag)


@triton.jit
def _e2m1_to_f32(c):
    e = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    normal = (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32))
    mag = tl.where(e == 0, 0.5 * m, normal)
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def _nvfp4_dequant_kernel(
    p_ptr, bs_ptr, gs_ptr, out_ptr, N, K, stride_pn, stride_bn, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # byte columns
    mask_n = offs_n < N
    mask_b = mask_n[:, None] & (offs_b < K // 2)[None, :]
    p = tl.load(p_ptr + offs_n[:, None] * stride_pn + offs_b[None, :], mask=mask_b, other=0).to(tl.int32)
    lo = _e2m1_to_f32(p & 0xF)
    hi = _e2m1_to_f32((p >> 4) & 0xF)
    vals = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # element 2i, then 2i + 1
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    bsc = tl.load(bs_ptr + offs_n[:, None] * stride_bn + (offs_k // 16)[None, :], mask=mask, other=0)
    gs = tl.load(gs_ptr).to(tl.float32)
    w = vals * (_e4m3_to_f32(bsc) * gs)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_nvfp4_triton(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                            dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W [N, K] in ``dtype`` from packed uint8 [N, K/2], block_scales float8_e4m3fn [N, K/16] and
    an fp32 scalar tensor. Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    N, K = packed.shape[0], packed.shape[1] * 2
    assert block_scales.shape == (N, K // NVFP4_BLOCK), (block_scales.shape, N, K)
    bs = block_scales.view(torch.uint8)
    gs = global_scale.reshape(1).float()
    out = torch.empty((N, K), dtype=dtype, device=packed.device)
    bn, bk = (16, 64) if packed.device.type != "cuda" else (32, 128)
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    _nvfp4_dequant_kernel[grid](packed, bs, gs, out, N, K, packed.stride(0), bs.stride(0), out.stride(0),
                                BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out
