"""KV-cache writes: reshape_and_cache and the fused RoPE + cache write."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.triton_fp8 import e4m3_bits
from rtllm.kernels.triton_rope import _inv, rope_launch

# --------------------------------------------------------------------------------------------
# reshape_and_cache


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    k_inv_scale,
    v_inv_scale,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    ok = slot >= 0  # negative slot: padding token, not cached
    slot = tl.maximum(slot, 0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < HKV)[:, None] & (offs_d < HEAD_DIM)[None, :] & ok
    blk = slot // PAGE
    row = slot % PAGE
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    kc = (
        kc_ptr
        + blk * stride_kcb
        + row * stride_kcs
        + offs_h[:, None] * stride_kch
        + offs_d[None, :] * stride_kcd
    )
    vc = (
        vc_ptr
        + blk * stride_vcb
        + row * stride_vcs
        + offs_h[:, None] * stride_vch
        + offs_d[None, :] * stride_vcd
    )
    if FP8:  # the caches are viewed as bytes
        tl.store(kc, e4m3_bits(k.to(tl.float32) * k_inv_scale), mask=mask)
        tl.store(vc, e4m3_bits(v.to(tl.float32) * v_inv_scale), mask=mask)
    else:
        tl.store(kc, k.to(tl.float32), mask=mask)
        tl.store(vc, v.to(tl.float32), mask=mask)


def reshape_and_cache_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Write k, v [T, Hkv, D] into cache slots ``slot_mapping`` [T] (int64; a negative slot is
    skipped). Caches: [num_blocks, block_size, Hkv, D]; values are cast to the cache dtype, or,
    for a float8_e4m3fn cache, quantized as e4m3(clamp(x / scale, +-448)) (k_scale / v_scale).
    Grid: one program per token (all its heads)."""
    T, Hkv, D = k.shape
    assert v.shape == k.shape and slot_mapping.shape[0] == T
    assert k_cache.shape[2:] == (Hkv, D) and v_cache.shape == k_cache.shape
    if T == 0:
        return
    bh, bd = triton.next_power_of_2(Hkv), triton.next_power_of_2(D)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _reshape_and_cache_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), _inv(k_scale), _inv(v_scale),
        HKV=Hkv, HEAD_DIM=D, BLOCK_H=bh, BLOCK_D=bd, PAGE=k_cache.shape[1], FP8=fp8,
        num_warps=4 if bh * bd >= 2048 else 1,
    )  # fmt: skip


def rope_and_cache_triton(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: rotate q [T, Hq, D] and k [T, Hkv, D] (neox RoPE, see :mod:`triton_rope`),
    write rotated k and v [T, Hkv, D] into slots ``slot_mapping`` of the paged caches, and
    return new (q_rot, k_rot). Grid: per token, blocks of q heads and one program for k, v. A
    float8_e4m3fn cache stores e4m3(clamp(x / scale, +-448)) with k_scale / v_scale. ``qk_norm`` =
    (q_weight, k_weight, eps): each head of q and k RMS-normalized first (Qwen3), in the same launch."""
    assert v.shape == k.shape and k_cache.shape[2:] == k.shape[1:] and v_cache.shape == k_cache.shape
    return rope_launch(positions, q, k, cos_sin_cache, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, qk_norm)
