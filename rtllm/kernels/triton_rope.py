"""Triton rotary position embedding (neox / "rotate_half" layout), optionally fused with the
paged-KV-cache write.

Semantics are those of :func:`rtllm.kernels.rope.apply_rope_torch`:

- ``cos_sin_cache``: [max_position, rotary_dim] = cat(cos, sin), any float dtype (read as fp32);
- ``q``: [T, Hq, D], ``k``: [T, Hkv, D] (any strides); ``positions``: [T] int32/int64;
- the first ``rotary_dim`` channels of every head rotate as
  ``(x1 * cos - x2 * sin, x2 * cos + x1 * sin)`` with ``x1, x2`` the two halves of those channels;
  channels ``rotary_dim..D-1`` pass through unchanged;
- math in fp32 with transformers' rounding: cos and sin rounded to the output dtype, each product
  and the sum rounded to it (as torch's ops in that dtype round); new tensors are returned.

Programs (t, j): token t's q heads in blocks of a few heads (Q_ELEMS_PER_PROGRAM elements), then one
program for its k heads (and, fused, its v heads): a decode step's single token spreads over several
SMs instead of one program's chain of loads over all its heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rtllm.kernels.triton_attention.common import pdl_enabled
from rtllm.kernels.triton_fp8 import e4m3_bits
from rtllm.kernels.triton_round import round_to


@triton.jit
def norm_scale(x, rstd, w, X_DT: tl.constexpr, O_DT: tl.constexpr):
    """RMSNorm of the rows x [H, n] (fp32) with their rstd [H] and the weight's channels w [n] (fp32); x was
    read from X_DT, the result is O_DT's (the normed tensor's promoted dtype), held in fp32."""
    xn = round_to(x * rstd[:, None], X_DT)
    return (xn * w[None, :]).to(O_DT).to(tl.float32)  # as the norm kernel stores it


@triton.jit
def _rope_heads(
    x_ptr,
    o_ptr,
    c_ptr,
    stride_xh,
    stride_xd,
    stride_oh,
    stride_od,
    stride_ch,
    stride_cd,
    cos,
    sin,
    c_ok,
    c_inv_scale,
    nw,
    eps,
    num_heads,
    HEAD_DIM: tl.constexpr,
    ROT_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_PASS: tl.constexpr,
    TO_CACHE: tl.constexpr,
    FP8: tl.constexpr = False,
    NORM: tl.constexpr = False,
    BLOCK_D: tl.constexpr = 1,
):
    """Rotate the heads of one token: x [H, D] -> o [H, D]; with TO_CACHE also -> c where c_ok
    (FP8: c holds e4m3 bytes of o * c_inv_scale). NORM: each head RMS-normalized first, with the weight's
    channels nw = (first rotated half, second rotated half, pass-through) in fp32 (_norm_weight's),
    rounded as rtllm.kernels.triton_norm rounds (normed value to x's dtype, times the weight to o's
    dtype, which is the normed tensor's promoted dtype), and that value rotated."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < num_heads
    mask = mask_h[:, None] & (offs_r < ROT_HALF)[None, :]
    x1_ptrs = x_ptr + offs_h[:, None] * stride_xh + offs_r[None, :] * stride_xd
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + ROT_HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # the statistics over the whole head row, summed as the RMSNorm kernel sums its row
        offs_d = tl.arange(0, BLOCK_D)
        xr = tl.load(x_ptr + offs_h[:, None] * stride_xh + offs_d[None, :] * stride_xd,
                     mask=mask_h[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xr * xr, axis=1) / HEAD_DIM + eps)
        x1 = norm_scale(x1, rstd, nw[0], x_ptr.dtype.element_ty, o_ptr.dtype.element_ty)
        x2 = norm_scale(x2, rstd, nw[1], x_ptr.dtype.element_ty, o_ptr.dtype.element_ty)
    # Round as the reference does (cos, sin, each product and the sum to the output dtype), then to
    # the cache dtype.
    dt = o_ptr.dtype.element_ty
    c = round_to(cos, dt)[None, :]
    s = round_to(sin, dt)[None, :]
    o1 = round_to(round_to(x1 * c, dt) - round_to(x2 * s, dt), dt).to(dt)
    o2 = round_to(round_to(x2 * c, dt) + round_to(x1 * s, dt), dt).to(dt)
    o1_ptrs = o_ptr + offs_h[:, None] * stride_oh + offs_r[None, :] * stride_od
    tl.store(o1_ptrs, o1, mask=mask)
    tl.store(o1_ptrs + ROT_HALF * stride_od, o2, mask=mask)
    if TO_CACHE:
        c1_ptrs = c_ptr + offs_h[:, None] * stride_ch + offs_r[None, :] * stride_cd
        if FP8:
            tl.store(c1_ptrs, e4m3_bits(o1.to(tl.float32) * c_inv_scale), mask=mask & c_ok)
            tl.store(c1_ptrs + ROT_HALF * stride_cd, e4m3_bits(o2.to(tl.float32) * c_inv_scale), mask=mask & c_ok)
        else:
            tl.store(c1_ptrs, o1, mask=mask & c_ok)
            tl.store(c1_ptrs + ROT_HALF * stride_cd, o2, mask=mask & c_ok)
    if HAS_PASS:
        offs_p = 2 * ROT_HALF + tl.arange(0, BLOCK_P)
        mask_p = mask_h[:, None] & (offs_p < HEAD_DIM)[None, :]
        xp = tl.load(
            x_ptr + offs_h[:, None] * stride_xh + offs_p[None, :] * stride_xd, mask=mask_p, other=0.0
        ).to(tl.float32)
        if NORM:
            xp = norm_scale(xp, rstd, nw[2], x_ptr.dtype.element_ty, o_ptr.dtype.element_ty)
        xp = xp.to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + offs_h[:, None] * stride_oh + offs_p[None, :] * stride_od, xp, mask=mask_p)
        if TO_CACHE:
            c_ptrs = c_ptr + offs_h[:, None] * stride_ch + offs_p[None, :] * stride_cd
            if FP8:
                tl.store(c_ptrs, e4m3_bits(xp.to(tl.float32) * c_inv_scale), mask=mask_p & c_ok)
            else:
                tl.store(c_ptrs, xp, mask=mask_p & c_ok)


@triton.jit
def _norm_weight(nw_ptr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_P: tl.constexpr, HAS_PASS: tl.constexpr):  # fmt: skip
    """The q or k norm's weight [D] as fp32 (first rotated half, second rotated half, pass-through channels)."""
    offs_r = tl.arange(0, BLOCK_R)
    w1 = tl.load(nw_ptr + offs_r, mask=offs_r < ROT_HALF, other=0.0).to(tl.float32)
    w2 = tl.load(nw_ptr + ROT_HALF + offs_r, mask=offs_r < ROT_HALF, other=0.0).to(tl.float32)
    offs_p = 2 * ROT_HALF + tl.arange(0, BLOCK_P)
    if HAS_PASS:
        wp = tl.load(nw_ptr + offs_p, mask=offs_p < HEAD_DIM, other=0.0).to(tl.float32)
    else:
        wp = tl.zeros((BLOCK_P,), dtype=tl.float32)
    return w1, w2, wp


@triton.jit
def _rope_kernel(
    pos_ptr,
    cs_ptr,
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_cs,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_qot,
    stride_qoh,
    stride_qod,
    stride_kot,
    stride_koh,
    stride_kod,
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
    qw_ptr,
    kw_ptr,
    eps,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_PASS: tl.constexpr,
    CACHE: tl.constexpr,
    PAGE: tl.constexpr,
    FP8: tl.constexpr,
    NORM: tl.constexpr,
    Q_BLOCKS: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (t, j): token t's q heads [j * BLOCK_HQ, (j + 1) * BLOCK_HQ) for j < Q_BLOCKS, its k heads
    (and v, cached) for j == Q_BLOCKS. PDL: launched while the qkv projection runs; what does not depend
    on it (position, cos / sin, cache slot, norm weight: step inputs and weights, written before this
    step's first kernel) is loaded first, q / k / v after the wait."""
    if PDL:
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < ROT_HALF
    cos = tl.load(cs_ptr + pos * stride_cs + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + ROT_HALF + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    if CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
    if NORM:
        if j < Q_BLOCKS:
            nw = _norm_weight(qw_ptr, HEAD_DIM, ROT_HALF, BLOCK_R, BLOCK_P, HAS_PASS)
        else:
            nw = _norm_weight(kw_ptr, HEAD_DIM, ROT_HALF, BLOCK_R, BLOCK_P, HAS_PASS)
    else:  # unused
        nw = (cos, sin, tl.zeros((BLOCK_P,), dtype=tl.float32))
    if PDL:
        gdc_wait()

    if j < Q_BLOCKS:
        h0 = j * BLOCK_HQ
        _rope_heads(
            q_ptr + t * stride_qt + h0 * stride_qh, qo_ptr + t * stride_qot + h0 * stride_qoh, qo_ptr, stride_qh,
            stride_qd, stride_qoh, stride_qod, 0, 0, cos, sin, False, 1.0, nw, eps,
            HQ - h0, HEAD_DIM, ROT_HALF, BLOCK_HQ, BLOCK_R, BLOCK_P, HAS_PASS, False, False, NORM, BLOCK_D,
        )  # fmt: skip
    elif CACHE:
        # A negative slot marks a padding token: it is rotated but not cached.
        ok = slot >= 0
        slot = tl.maximum(slot, 0)
        kc_tok = kc_ptr + (slot // PAGE) * stride_kcb + (slot % PAGE) * stride_kcs
        _rope_heads(
            k_ptr + t * stride_kt, ko_ptr + t * stride_kot, kc_tok, stride_kh, stride_kd,
            stride_koh, stride_kod, stride_kch, stride_kcd, cos, sin, ok, k_inv_scale, nw, eps,
            HKV, HEAD_DIM, ROT_HALF, BLOCK_HKV, BLOCK_R, BLOCK_P, HAS_PASS, True, FP8, NORM, BLOCK_D,
        )  # fmt: skip
        offs_h = tl.arange(0, BLOCK_HKV)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < HKV)[:, None] & (offs_d < HEAD_DIM)[None, :]
        v = tl.load(
            v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
            mask=mask & ok,
            other=0.0,
        ).to(tl.float32)
        vc_tok = vc_ptr + (slot // PAGE) * stride_vcb + (slot % PAGE) * stride_vcs
        if FP8:
            vq = e4m3_bits(v * v_inv_scale)
        else:
            vq = v.to(v_ptr.dtype.element_ty)
        tl.store(vc_tok + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd, vq, mask=mask & ok)
    else:
        _rope_heads(
            k_ptr + t * stride_kt, ko_ptr + t * stride_kot, ko_ptr, stride_kh, stride_kd,
            stride_koh, stride_kod, 0, 0, cos, sin, False, 1.0, nw, eps,
            HKV, HEAD_DIM, ROT_HALF, BLOCK_HKV, BLOCK_R, BLOCK_P, HAS_PASS, False, False, NORM, BLOCK_D,
        )  # fmt: skip


def _inv(scale: float) -> float:
    """1 / scale as the references compute it (fp32 scale, fp32 inverse)."""
    s = float(torch.tensor(float(scale), dtype=torch.float32))
    return float(torch.tensor(1.0 / s, dtype=torch.float32))


Q_ELEMS_PER_PROGRAM = 1024  # q elements (heads x head_dim, padded) a program rotates


def _num_warps(elems: int) -> int:
    return 1 if elems <= 512 else 2 if elems <= 2048 else 4 if elems <= 8192 else 8


def rope_launch(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    v: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    q_heads_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared launcher of :func:`apply_rope_triton` and ``rope_and_cache_triton``.

    With ``k_cache`` given, rotated k and v of token t are also written to the paged-cache slot
    ``slot_mapping[t]`` (cache layout [num_blocks, block_size, Hkv, D]; slot < 0 is skipped).
    A float8_e4m3fn cache gets e4m3(clamp(x / scale, +-448)) (the bytes of
    :func:`rtllm.kernels.attention.quantize_kv`).

    ``qk_norm`` = (q_weight [D], k_weight [D], eps): every head of q and k is first RMS-normalized
    (Qwen3's q_norm / k_norm), bit for bit as rtllm.kernels.triton_norm.rms_norm_triton on the
    [T, H, D] tensor would, and the normed heads (in promote_types(x.dtype, weight.dtype), as the
    norm returns them) are rotated and cached; v is not normed.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape[0] == T and k.shape[2] == D and positions.shape[0] == T
    rot = cos_sin_cache.shape[-1]
    assert rot % 2 == 0 and rot <= D, "rotary_dim must be even and <= head_dim"
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    if qk_norm is not None:
        qw, kw, eps = qk_norm
        assert qw.shape == kw.shape == (D,) and qw.stride(0) == kw.stride(0) == 1
        q_dtype, k_dtype = torch.promote_types(q.dtype, qw.dtype), torch.promote_types(k.dtype, kw.dtype)
    else:
        qw, kw, eps = q, k, 0.0  # unused placeholders
        q_dtype, k_dtype = q.dtype, k.dtype
    q_out = torch.empty(q.shape, dtype=q_dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k_dtype, device=k.device)
    if T == 0:
        return q_out, k_out
    cache = k_cache is not None
    if cache:
        assert v is not None and v_cache is not None and slot_mapping is not None
        assert v_cache.dtype == k_cache.dtype
        page = k_cache.shape[1]
        vv, kc, vc, sm = v, k_cache, v_cache, slot_mapping
        fp8 = k_cache.dtype == torch.float8_e4m3fn
        if fp8:  # written as bytes (see triton_fp8)
            kc, vc = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    else:
        page, fp8 = 1, False
        vv, kc, vc, sm = k, k, k, positions  # unused placeholders
    rot_half = rot // 2
    block_r = triton.next_power_of_2(max(rot_half, 1))
    block_p = triton.next_power_of_2(max(D - rot, 1))
    block_d = triton.next_power_of_2(D)
    if q_heads_per_program is None:  # a token's q heads over a few programs (decode: a single token)
        q_heads_per_program = max(1, Q_ELEMS_PER_PROGRAM // block_d)
    block_hq = min(triton.next_power_of_2(Hq), triton.next_power_of_2(q_heads_per_program))
    block_hkv = triton.next_power_of_2(Hkv)
    q_blocks = triton.cdiv(Hq, block_hq)
    # positions, cos / sin and the slots are read before the PDL wait: a cos / sin copy made just now must not be
    pdl = pdl_enabled(q) and cs is cos_sin_cache
    _rope_kernel[(T, q_blocks + 1)](
        positions, cs, q, k, q_out, k_out, vv, kc, vc, sm,
        cs.stride(0),
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *vv.stride()[-3:],
        *(kc.stride() if cache else (0, 0, 0, 0)),
        *(vc.stride() if cache else (0, 0, 0, 0)),
        _inv(k_scale), _inv(v_scale), qw, kw, eps,
        HQ=Hq, HKV=Hkv, HEAD_DIM=D, ROT_HALF=rot_half,
        BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_R=block_r, BLOCK_P=block_p,
        BLOCK_D=block_d, HAS_PASS=rot < D, CACHE=cache, PAGE=page, FP8=fp8,
        NORM=qk_norm is not None, Q_BLOCKS=q_blocks, num_warps=_num_warps(max(block_hq, block_hkv) * block_d),
        enable_fp_fusion=False, PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    return q_out, k_out


def apply_rope_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q [T, Hq, D] and k [T, Hkv, D] at ``positions`` [T]; returns new (q_rot, k_rot).

    ``cos_sin_cache`` is [max_position, rotary_dim] = cat(cos, sin); rotary_dim may be smaller
    than D (partial rotary: the trailing channels pass through).
    Grid: per token, blocks of q heads and one program for k.
    """
    return rope_launch(positions, q, k, cos_sin_cache)
