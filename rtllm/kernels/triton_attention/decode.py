"""Flash-decoding over a paged cache: split-K partials, then a reduction."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rtllm.kernels.triton_attention.common import (
    LOG2E,
    TL_DTYPES,
    dot_config,
    interpreting,
    pdl_enabled,
    sm_count,
)
from rtllm.kernels.triton_attention.decode_rope import (
    DecodeRope,
    cache_kv_row,
    norm_weights,
    rope_args,
    rope_channels,
    rotate_rows,
)
from rtllm.kernels.triton_attention.decode_splits import (
    DECODE_MAX_SPLITS,
    decode_num_splits,
    decode_reduce_kernel,
    merge_counters,
    merge_in_last_split,
    merge_mode,
    split_tokens_of,
)
from rtllm.kernels.triton_attention.kv_tiles import prefetch_kv_rows, prefetched_tiles, to_dot
from rtllm.kernels.triton_attention.prefill import cache_dot_dtype
from rtllm.kernels.triton_fp8 import readable_as_words

__all__ = ["DECODE_MAX_SPLITS", "decode_num_splits", "paged_decode_attention_triton"]


# Integer arguments that change from step to step are not specialized (Triton would compile one
# variant per "== 1" / "divisible by 16" class of each, and a compile stalls the step loop for
# ~1 s whenever serving first meets a new class).
@triton.jit(do_not_specialize=["num_splits", "stride_btb", "bt_cols"])
def _decode_split_kernel(
    q_ptr,
    kn_ptr,
    vn_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    cnt_ptr,
    qk_scale,
    qk_scale_cache,
    v_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_knb,
    stride_knh,
    stride_knd,
    stride_vnb,
    stride_vnh,
    stride_vnd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_btb,
    bt_cols,
    stride_ob,
    stride_oh,
    stride_od,
    pos_ptr,
    cs_ptr,
    slot_ptr,
    qw_ptr,
    kw_ptr,
    kcw_ptr,
    vcw_ptr,
    stride_cs,
    stride_kcwb,
    stride_kcwt,
    stride_kcwh,
    stride_kcwd,
    stride_vcwb,
    stride_vcwt,
    stride_vcwh,
    stride_vcwd,
    eps,
    k_inv_scale,
    v_inv_scale,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,
    KV_WORDS: tl.constexpr = False,
    CVT_ASM: tl.constexpr = False,
    PDL: tl.constexpr = False,
    MERGE: tl.constexpr = False,
    BLOCK_S: tl.constexpr = 16,
    MERGE_H: tl.constexpr = 1,
    MERGE_CHUNK: tl.constexpr = 1,
    ROPE: tl.constexpr = False,
    ROT_HALF: tl.constexpr = 1,
    NORM: tl.constexpr = False,
):
    """Program (b, kv head, split): the G query heads of the group against tokens
    [split * split_tokens, min(+split_tokens, seq_len)), split_tokens from sequence b's own length
    (decode_splits.split_tokens_of: a multiple of BLOCK_N); in the split that holds it, the token being
    decoded from kn / vn (fp32 FMA), then the cached ones before seq_len - 1 in dots of dtype DOT.
    Writes (max, sum, unnormalized out) in the log2 domain, or the final output when there is one split;
    MERGE: then the last split of (b, kv head) to finish merges them (decode_splits.merge_in_last_split).
    KV_FP8: cached K/V tiles are e4m3, converted (exactly) to DOT (fp16 for a 16-bit q); k_scale is folded
    into qk_scale_cache, v_scale multiplies the cached part of the sum once.
    PDL: launched while RoPE + cache write runs (the next launch may start). Before the wait, what does not
    depend on that kernel: the sequence length and the first tile's block-table entries (step inputs), and
    an L2 prefetch of that tile's cached rows (a hint; the rows were written by earlier steps, and the
    token this step writes is read from kn / vn, never from the cache); q, kn and vn after it.
    ROPE: q, kn are the projection's (before RoPE, and before the per-head RMSNorm where NORM); the kernel
    rotates them at pos_ptr[b] and the split that holds the decoded token writes its K/V to the cache slot
    slot_ptr[b] through kcw / vcw (decode_rope; launched with PDL after the qkv projection: position, cos /
    sin, slot and norm weights before the wait)."""
    if PDL:
        gdc_launch_dependents()
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + b)
    split_tokens = split_tokens_of(seq_len, num_splits, BLOCK_N)
    start = s * split_tokens
    last = seq_len - 1  # the token being decoded: fresh in kn / vn, not read from the cache
    end = tl.minimum(start + split_tokens, last)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    if ROPE:  # step inputs and weights
        cos, sin, partner = rope_channels(cs_ptr, tl.load(pos_ptr + b), stride_cs, offs_d, ROT_HALF)
        qw, qw_partner = norm_weights(qw_ptr, offs_d, partner, mask_d, NORM)
        kw, kw_partner = norm_weights(kw_ptr, offs_d, partner, mask_d, NORM)
        slot = tl.load(slot_ptr + b)
    if PDL:
        ROW_BYTES: tl.constexpr = HEAD_DIM * (1 if KV_FP8 else k_ptr.dtype.element_ty.primitive_bitwidth // 8)
        prefetch_kv_rows(k_ptr, v_ptr, bt_ptr + b.to(tl.int64) * stride_btb, start + tl.arange(0, BLOCK_N), end, hk,
                         stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, PAGE, ROW_BYTES)
        gdc_wait()

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    heads = hk * G + offs_g
    mask_q = mask_g[:, None] & mask_d[None, :]
    if ROPE:
        q = rotate_rows(q_ptr + b * stride_qb, stride_qh, stride_qd, heads, mask_g, offs_d, partner, cos, sin, qw,
                        qw_partner, eps, HEAD_DIM, ROT_HALF, NORM, q_ptr.dtype.element_ty)
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=mask_q,
                    other=0.0)
    if KV_FP8 and tl.float16 == DOT:  # bf16 q -> fp16: saturate (|q| > 65504 would be inf)
        qc = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(DOT)
    else:
        qc = q.to(DOT)

    # the token being decoded (fresh kn / vn, fp32 FMA) starts the online softmax of the split that holds
    # it; its value is stored divided by v_scale, which the cached part's sum is multiplied by at the end
    own = (last >= start) & (last < start + split_tokens)
    vn = tl.load(vn_ptr + b * stride_vnb + (hk * stride_vnh + offs_d * stride_vnd), mask=mask_d & own, other=0.0)
    if ROPE:
        one = tl.arange(0, 1)
        kn = tl.reshape(rotate_rows(kn_ptr + b * stride_knb, stride_knh, stride_knd, hk + one, (one < 1) & own, offs_d,
                                    partner, cos, sin, kw, kw_partner, eps, HEAD_DIM, ROT_HALF, NORM,
                                    kn_ptr.dtype.element_ty), [BLOCK_D])
        cache_kv_row(kcw_ptr, vcw_ptr, slot, hk, offs_d, mask_d & own & (slot >= 0), kn, vn, stride_kcwb, stride_kcwt,
                     stride_kcwh, stride_kcwd, stride_vcwb, stride_vcwt, stride_vcwh, stride_vcwd, k_inv_scale,
                     v_inv_scale, PAGE, KV_FP8)
    else:
        kn = tl.load(kn_ptr + b * stride_knb + (hk * stride_knh + offs_d * stride_knd), mask=mask_d & own, other=0.0)
    qk_own = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * qk_scale
    m_i = tl.where(own, qk_own, float("-inf"))
    l_i = tl.where(own, tl.full([BLOCK_G], 1.0, tl.float32), 0.0)
    if KV_FP8:
        vn = vn.to(tl.float32) / v_scale
    acc = tl.where(own, tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + vn.to(tl.float32)[None, :], 0.0)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    if KV_WORDS:  # the cache as int32 words of four e4m3 codes
        offs_c = tl.arange(0, BLOCK_D // 4)
        mask_c = offs_c < HEAD_DIM // 4
    else:
        offs_c = offs_d
        mask_c = mask_d
    k_head = k_ptr + hk * stride_kh + offs_c[None, :] * stride_kd
    v_head = v_ptr + hk * stride_vh + offs_c[None, :] * stride_vd
    if PREFETCH > 0:
        m_i, l_i, acc = prefetched_tiles(qc, k_head, v_head, bt_row, bt_cols, start, end, offs_n, mask_c, stride_kb,
                                         stride_kt, stride_vb, stride_vt, m_i, l_i, acc, qk_scale_cache, PAGE,
                                         BLOCK_N, PREFETCH, DOT, DOT_PREC, KV_WORDS, CVT_ASM)
    else:  # the default: decode_tile's fold written out, so that V is loaded only after the scores
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            mask_n = pos < end
            blk = tl.load(bt_row + pos // PAGE, mask=mask_n, other=0).to(tl.int64)
            row = pos % PAGE
            mask_kv = mask_n[:, None] & mask_c[None, :]
            k = tl.load(k_head + (blk * stride_kb + row * stride_kt)[:, None], mask=mask_kv, other=0.0)
            k = to_dot(k, DOT, KV_WORDS, CVT_ASM)
            qk = tl.dot(qc, tl.trans(k), input_precision=DOT_PREC) * qk_scale_cache
            qk = tl.where(mask_n[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_head + (blk * stride_vb + row * stride_vt)[:, None], mask=mask_kv, other=0.0)
            v = to_dot(v, DOT, KV_WORDS, CVT_ASM)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=DOT_PREC)
            m_i = m_new
    if KV_FP8:
        acc = acc * v_scale

    if ONE_SPLIT:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=mask_q,
        )
    else:
        # partials: m/l [B, Hq, S], acc [B, Hq, S, D], contiguous
        part = (b.to(tl.int64) * (num_kv_heads * G) + heads) * num_splits + s
        tl.store(m_ptr + part, m_i, mask=mask_g)
        tl.store(l_ptr + part, l_i, mask=mask_g)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_q)
        if MERGE:
            merge_in_last_split(out_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr, b, hk, num_kv_heads, num_splits, seq_len,
                                split_tokens, stride_ob, stride_oh, stride_od, G, MERGE_H, HEAD_DIM, BLOCK_D, BLOCK_S,
                                MERGE_CHUNK)


def paged_decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    cache_dot: torch.dtype | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch: int | None = None,
    max_regs: int | None = None,
    fp8_words: bool | None = None,
    merge: str | None = None,
    rope: DecodeRope | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D], with the step's own k, v [B, Hkv, D] -> [B, Hq, D]
    (q's dtype).

    Sequence b's query sits at position seq_lens[b] - 1. It attends to itself through k[b], v[b] (the
    rotated K/V rope_and_cache wrote to the cache this step, in q's dtype: the cached copy is not read)
    and to positions [0, seq_lens[b] - 1) through the cache, as a prefill chunk does to its own tokens
    and its prefix (see :func:`paged_prefill_attention_triton`); so a token's attention does not
    depend on whether it ran as a decode or as a one-token chunk.

    Flash-decoding: one launch of grid (B, Hkv, num_splits); each program loads the G = Hq/Hkv query heads
    of one KV head once (padded to >= 16 rows for tensor cores) and streams its split of the sequence's KV
    in BLOCK_N-token tiles (gathered through the block table, any block_size), keeping an online softmax
    in fp32. With one split it writes the output directly. Several are merged (``merge``, default
    decode_splits.merge_mode's) by a second launch of grid (B, Hq) ("launch"), or by the last split of each
    (sequence, KV head) to finish, in the same launch ("last_split"; a second launch where the arrival
    counters are not available: decode_splits.merge_counters). ``max_seq_len`` must be >= every
    seq_lens[b]; it only sizes the split grid (:func:`decode_num_splits`): each sequence's splits hold its
    own length over the grid's splits, in whole tiles (decode_splits.split_tokens_of). ``num_splits``,
    ``block_n``, ``num_warps``, ``num_stages``, ``prefetch`` (0: Triton's pipeliner; 1, 2: tiles loaded
    that many ahead in registers), ``max_regs`` (ptxas register cap) and ``fp8_words`` (an e4m3 cache read
    as int32 words of four codes, decoded two codes an instruction: the default where the dots run in
    fp16, head_dim % 4 == 0 and the caches are 4-byte aligned) override the heuristics (tests, tuning). A
    float8_e4m3fn cache is read as its values times ``k_scale`` / ``v_scale``, its tiles converted to fp16
    for the dots (prefill.cache_dot_dtype; ``cache_dot`` overrides it: benchmarks).

    ``rope`` (a DecodeRope: the step's positions, cos / sin table, cache slots and q/k norms): q and k are
    the projection's, before RoPE (and the per-head norms); the kernel rotates them as rope_and_cache would
    and writes the step's K/V to the cache itself, so no RoPE + cache-write launch runs before it
    (decode_rope)."""
    B, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert k.shape == (B, Hkv, D) and v.shape == k.shape
    G = Hq // Hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    block_d = triton.next_power_of_2(D)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    dot_dtype = cache_dot or cache_dot_dtype(q.dtype, k_cache.dtype)
    esize = torch.tensor([], dtype=dot_dtype).element_size()
    words = ((True if fp8_words is None else fp8_words) and fp8 and dot_dtype == torch.float16
             and readable_as_words(k_cache) and readable_as_words(v_cache))
    tuned_words = words and block_d <= 128 and block_n is None and num_warps is None and num_stages is None
    if tuned_words and max_regs is None:
        # e4m3 words (H100, 512 sequences of ~194 tokens, scripts/fp8_kv_attention_bench.py --sweep): 64-token
        # tiles, 4 warps, 2 stages, 96 registers (5 programs an SM): 102.6 us a layer; the byte tiles' best
        # (32, 4 warps, 3 stages) 125.0; a bf16 cache 148.8. 2 warps: 101.9-102.7 here, but 41.5 vs 39.5 us at
        # 32 sequences of ~760 tokens. Register prefetch (prefetch=1/2) measured slower: 126-204 us.
        max_regs = 96
    if block_n is None:  # sm_90a: no spills at these sizes (16-bit: <= 117 regs; fp32 FMA: <= 92)
        if words and block_d <= 128:
            block_n = 64
        elif fp8 and esize == 2 and block_d <= 128:
            # e4m3 byte tiles: 32 tokens (H100, 512 sequences of ~190 tokens, scripts/fp8_kv_attention_bench.py
            # --sweep: 124 us a layer vs 158 at 64, and vs 149 for a bf16 cache; 64 with 2 stages: 128)
            block_n = 32
        elif esize >= 4:
            block_n = 32 if block_d <= 128 else 16
        else:
            block_n = 64 if block_d <= 128 else 32
    if num_splits is None:
        num_splits, _ = decode_num_splits(B, Hkv, max_seq_len, block_n, sm_count(q))
    else:
        split_tokens = triton.cdiv(triton.cdiv(max(int(max_seq_len), 1), num_splits), block_n) * block_n
        num_splits = triton.cdiv(max(int(max_seq_len), 1), split_tokens)
    upcast, prec = dot_config(q, dot_dtype)
    block_g = max(16, triton.next_power_of_2(G))
    one = num_splits == 1
    pdl = pdl_enabled(q)
    cnt = None if merge_mode(merge) == "launch" or one else merge_counters(q.device, B * Hkv)
    if one:
        m = lsum = acc = out  # unused
    else:
        m = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
        lsum = torch.empty_like(m)
        acc = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    num_warps = num_warps or (4 if block_g * block_d <= 64 * 128 else 8)
    prefetch = prefetch or 0
    kc, vc = (k_cache.view(torch.int32), v_cache.view(torch.int32)) if words else (k_cache, v_cache)
    stages = num_stages or (1 if prefetch else 2 if tuned_words else 3 if (esize <= 2 and block_d <= 128) else 2)
    block_s, merge_h = max(16, triton.next_power_of_2(num_splits)), triton.next_power_of_2(G)
    r = rope_args(rope, q, k, k_cache, v_cache, k_scale, v_scale)
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k, v, kc, vc, block_tables, seq_lens, out, m, lsum, acc, out if cnt is None else cnt,
        scale * LOG2E, scale * LOG2E * (float(k_scale) if fp8 else 1.0), float(v_scale), num_splits,
        *q.stride(), *k.stride(), *v.stride(), *kc.stride(), *vc.stride(), block_tables.stride(0),
        block_tables.shape[1], *out.stride(), *r,
        G=G, BLOCK_G=block_g, HEAD_DIM=D, BLOCK_D=block_d, PAGE=page, BLOCK_N=block_n,
        ONE_SPLIT=one, DOT=tl.float32 if upcast else TL_DTYPES[dot_dtype], DOT_PREC=prec, KV_FP8=fp8,
        PREFETCH=prefetch, KV_WORDS=words, CVT_ASM=words and not interpreting(q), PDL=pdl,
        MERGE=cnt is not None, BLOCK_S=16 if cnt is None else max(DECODE_MAX_SPLITS, block_s), MERGE_H=merge_h,
        MERGE_CHUNK=max(1, 4096 // (merge_h * block_d)), ROPE=rope is not None,
        ROT_HALF=1 if rope is None else rope.cos_sin_cache.shape[-1] // 2,
        NORM=rope is not None and rope.qk_norm is not None,
        num_warps=num_warps, num_stages=stages, launch_pdl=pdl, **({"maxnreg": max_regs} if max_regs else {}),
    )  # fmt: skip
    if not one and cnt is None:
        decode_reduce_kernel[(B, Hq)](
            out, m, lsum, acc, seq_lens, num_splits, *out.stride(),
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=block_s,
            ALIGN=block_n, PDL=pdl, num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
    return out
