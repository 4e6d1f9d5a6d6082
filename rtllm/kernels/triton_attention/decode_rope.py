"""RoPE (with Qwen3's per-head q/k RMSNorm) and the KV-cache write of a decode step, done by the
flash-decoding split kernel itself (rtllm.kernels.triton_attention.decode, ``rope=``), so a pure-decode
step skips the RoPE + cache-write launch (1.3 us a layer on an H100 at batch 1, docs/PERF.md).

Every split program of a (sequence, KV head) rotates its G query heads (a few hundred values, redundant
across the splits); the program whose split holds the token being decoded rotates that token's key, uses
it fresh as before, and writes it and the value to the cache slot. No other program reads that slot this
step (the splits read positions before the decoded token from the cache), so there is no race.

Bits: the rotation is rope_and_cache's (triton_rope._rope_heads): cos and sin rounded to the output dtype,
each product and the sum rounded to it, the norm through triton_rope.norm_scale. Channel d < R of a head
(R = rotary_dim / 2) pairs with d + R, and d in [R, 2R) with d - R; so ``x * cos + partner * signed_sin``
per channel gives the two halves' formulas (negation is exact). The RoPE kernel launches without FMA
fusion (triton_round: a fused multiply-add skips a product's rounding); the decode kernel keeps fusion for
its attention math, so the rotation's and the norm statistic's products and sums are explicit
round-to-nearest operations (PTX ``mul.rn.f32`` / ``add.rn.f32`` when compiled), which ptxas never fuses.
With Qwen3's q/k norms one difference remains on a GPU: the norm's sum of squares over a head row is a
reduction whose order follows the tile's layout, which the two kernels choose differently for the key row,
so its statistic (and then a bf16 value of the key) can differ in the last place (simulated: ~2e-4 of key
rows); the fused kernel's own cached and used keys stay equal to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rtllm.kernels.triton_fp8 import e4m3_bits
from rtllm.kernels.triton_rope import _inv, norm_scale
from rtllm.kernels.triton_round import COMPILED, round_to


@dataclass(frozen=True)
class DecodeRope:
    """What the decode kernel needs to rotate q and k and cache the step's K/V itself."""

    positions: torch.Tensor  # [B] int32 / int64: each sequence's decoded position (seq_len - 1)
    cos_sin_cache: torch.Tensor  # [max_position, rotary_dim] = cat(cos, sin), rows contiguous
    slot_mapping: torch.Tensor  # [B] int64: the cache slot of each decoded token (negative: not cached)
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (q weight [D], k weight [D], eps)


def rope_args(rope: DecodeRope | None, q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, k_scale: float, v_scale: float) -> tuple:
    """The decode kernel's RoPE arguments (pointers, table row stride, the caches' write views and strides,
    eps, 1 / k_scale, 1 / v_scale), checked against q [B, Hq, D] and k [B, Hkv, D]; without ``rope``,
    placeholders the kernel does not read."""
    if rope is None:
        return (q,) * 7 + (0,) * 12
    B, _, D = q.shape
    cs = rope.cos_sin_cache
    rot = cs.shape[-1]
    if cs.dim() != 2 or cs.stride(-1) != 1 or rot % 2 or rot > D:
        raise ValueError(f"DecodeRope: cos_sin_cache {tuple(cs.shape)} must be [positions, rotary_dim] with rows "
                         f"contiguous and an even rotary_dim <= head_dim {D}")
    if rope.positions.shape != (B,) or rope.slot_mapping.shape != (B,):
        raise ValueError(f"DecodeRope: positions {tuple(rope.positions.shape)} and slot_mapping "
                         f"{tuple(rope.slot_mapping.shape)} must have one entry a sequence ({B})")
    if B > 1 and (rope.positions.stride(0) != 1 or rope.slot_mapping.stride(0) != 1):
        raise ValueError("DecodeRope: positions and slot_mapping must be contiguous")
    if rope.qk_norm is None:
        qw, kw, eps = q, q, 0.0  # unused
    else:
        qw, kw, eps = rope.qk_norm
        if qw.shape != (D,) or kw.shape != (D,) or qw.stride(0) != 1 or kw.stride(0) != 1 or (
                torch.promote_types(q.dtype, qw.dtype) != q.dtype or torch.promote_types(k.dtype, kw.dtype) != k.dtype):
            raise ValueError("DecodeRope: the q/k norm weights must be contiguous [head_dim] vectors that do not "
                             "widen q's or k's dtype")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    kcw, vcw = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if fp8 else (k_cache, v_cache)
    return (rope.positions, cs, rope.slot_mapping, qw, kw, kcw, vcw, cs.stride(0), *kcw.stride(), *vcw.stride(),
            float(eps), _inv(k_scale), _inv(v_scale))


@triton.jit
def _mul(a, b):
    """fp32 a * b, rounded to nearest on its own: PTX's ``mul.rn.f32``, which ptxas never fuses into an FMA
    (libdevice's mul_rn lowers to the flush-to-zero form, which a plain product is not)."""
    if COMPILED:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _add(a, b):
    """fp32 a + b, rounded to nearest on its own (``add.rn.f32``)."""
    if COMPILED:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a + b


@triton.jit
def rope_channels(cs_ptr, pos, stride_cs, offs_d, ROT_HALF: tl.constexpr):
    """(cos, signed sin, partner channel) of the channels offs_d of a head at position pos, from the
    [max_position, 2R] cat(cos, sin) table (fp32); channels past 2R pass through (cos 1, sin 0)."""
    first = offs_d < ROT_HALF
    rot = offs_d < 2 * ROT_HALF
    j = tl.where(first, offs_d, offs_d - ROT_HALF)
    row = cs_ptr + pos.to(tl.int64) * stride_cs
    cos = tl.load(row + j, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(row + ROT_HALF + j, mask=rot, other=0.0).to(tl.float32)
    partner = tl.where(first, offs_d + ROT_HALF, tl.where(rot, offs_d - ROT_HALF, offs_d))
    return cos, tl.where(first, -sin, sin), partner


@triton.jit
def rotate_rows(x_ptr, stride_h, stride_d, rows, mask_rows, offs_d, partner, cos, sin, w, w_partner, eps,
                HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, NORM: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """Heads ``rows`` of one token (x [H, D] of dtype DT) rotated (NORM: RMS-normalized first, weight channels
    w and their partners' w_partner in fp32): [len(rows), BLOCK_D] fp32 holding DT values, as
    rope_and_cache returns them."""
    mask = mask_rows[:, None] & (offs_d < HEAD_DIM)[None, :]
    base = x_ptr + rows[:, None] * stride_h
    x = tl.load(base + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    if NORM:  # the statistics over the whole head row, as the RoPE kernel and the RMSNorm kernel sum it
        rstd = 1.0 / tl.sqrt(_add(tl.sum(_mul(x, x), axis=1) / HEAD_DIM, eps))
        x = norm_scale(x, rstd, w, DT, DT)
        xp = norm_scale(xp, rstd, w_partner, DT, DT)
    c = round_to(cos, DT)[None, :]
    s = round_to(sin, DT)[None, :]
    o = round_to(_add(round_to(_mul(x, c), DT), round_to(_mul(xp, s), DT)), DT)
    return tl.where((offs_d < 2 * ROT_HALF)[None, :], o, x)  # pass-through channels: x (normed) as read


@triton.jit
def norm_weights(w_ptr, offs_d, partner, mask_d, NORM: tl.constexpr):
    """A q or k norm's weight at the channels offs_d and at their partners (fp32; NORM off: unused ones)."""
    if NORM:
        return (tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32),
                tl.load(w_ptr + partner, mask=mask_d, other=0.0).to(tl.float32))
    else:
        return offs_d.to(tl.float32), offs_d.to(tl.float32)


@triton.jit
def cache_kv_row(kc_ptr, vc_ptr, slot, hk, offs_d, mask, k, v, stride_kb, stride_kt, stride_kh, stride_kd, stride_vb,
                 stride_vt, stride_vh, stride_vd, k_inv_scale, v_inv_scale, PAGE: tl.constexpr,
                 FP8: tl.constexpr):  # fmt: skip
    """Write KV head hk's rotated key k and value v [BLOCK_D] to cache slot ``slot`` where mask (FP8: the
    caches viewed as bytes hold e4m3(x / scale), as rope_and_cache writes them)."""
    slot = tl.maximum(slot, 0).to(tl.int64)
    blk = slot // PAGE
    row = slot % PAGE
    kc = kc_ptr + blk * stride_kb + row * stride_kt + hk * stride_kh + offs_d * stride_kd
    vc = vc_ptr + blk * stride_vb + row * stride_vt + hk * stride_vh + offs_d * stride_vd
    if FP8:
        tl.store(kc, e4m3_bits(k * k_inv_scale), mask=mask)
        tl.store(vc, e4m3_bits(v.to(tl.float32) * v_inv_scale), mask=mask)
    else:
        tl.store(kc, k, mask=mask)
        tl.store(vc, v, mask=mask)
