"""The K/V tile steps of flash-decoding (rtllm.kernels.triton_attention.decode): prefetch (to L2) or load a tile
of cached rows through the block table, turn it into the dots' dtype (FP8 caches read as int32 words of four e4m3 codes,
decoded in pairs), and fold it into the online softmax."""

from __future__ import annotations

import triton
import triton.language as tl

from rtllm.kernels.triton_fp8 import e4m3_words_to_f16


@triton.jit
def decode_tile(qc, k, v, mask_n, m_i, l_i, acc, qk_scale_cache, DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over a [BLOCK_N, D] K/V tile (rows past mask_n hold zeros)."""
    qk = tl.dot(qc, tl.trans(k), input_precision=DOT_PREC) * qk_scale_cache
    qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def to_dot(x, DOT: tl.constexpr, KV_WORDS: tl.constexpr, CVT_ASM: tl.constexpr):
    """A loaded K/V tile in the dots' dtype (words of e4m3 codes where KV_WORDS)."""
    if KV_WORDS:
        return e4m3_words_to_f16(x, CVT_ASM)
    else:
        return x.to(DOT)


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines holding ``ptrs`` (a hint: no value, no fault; compiled kernels only)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_kv_rows(k_ptr, v_ptr, bt_row, pos, end, hk, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                     stride_vh, PAGE: tl.constexpr, ROW_BYTES: tl.constexpr):  # fmt: skip
    """L2 prefetch of the cached K and V rows of KV head hk at positions pos through the block table row bt_row
    (each row ROW_BYTES contiguous bytes, 128-byte aligned; positions >= end prefetch rows of block 0, a
    harmless hint). A prefetch returns nothing, so it cannot read stale data whatever runs meanwhile."""
    blk = tl.load(bt_row + pos // PAGE, mask=pos < end, other=0).to(tl.int64)
    row = pos % PAGE
    EB: tl.constexpr = k_ptr.dtype.element_ty.primitive_bitwidth // 8
    k_rows = k_ptr + hk * stride_kh + blk * stride_kb + row * stride_kt
    v_rows = v_ptr + hk * stride_vh + blk * stride_vb + row * stride_vt
    for line in tl.static_range(triton.cdiv(ROW_BYTES, 128)):
        prefetch_l2(k_rows + line * (128 // EB))
        prefetch_l2(v_rows + line * (128 // EB))


@triton.jit
def load_kv_tile(
    k_head, v_head, blk, pos, end, mask_c, stride_kb, stride_kt, stride_vb, stride_vt, PAGE: tl.constexpr
):
    """K and V rows at positions pos (block ids blk), zeros at pos >= end: the cache's dtype."""
    mask_kv = (pos < end)[:, None] & mask_c[None, :]
    row = pos % PAGE
    k = tl.load(k_head + (blk * stride_kb + row * stride_kt)[:, None], mask=mask_kv, other=0.0)
    v = tl.load(v_head + (blk * stride_vb + row * stride_vt)[:, None], mask=mask_kv, other=0.0)
    return k, v


@triton.jit
def prefetched_tiles(qc, k_head, v_head, bt_row, bt_cols, start, end, offs_n, mask_c, stride_kb, stride_kt, stride_vb,
                     stride_vt, m_i, l_i, acc, qk_scale_cache, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                     PREFETCH: tl.constexpr, DOT: tl.constexpr, DOT_PREC: tl.constexpr, KV_WORDS: tl.constexpr,
                     CVT_ASM: tl.constexpr):  # fmt: skip
    """The split's tiles [start, end) folded into (m_i, l_i, acc), software-pipelined in registers: tile
    i + PREFETCH's K/V are loaded (ld.global, nothing waits on them) before tile i is used, and the
    block-table entries of the tile after that one before that, so PREFETCH (1 or 2) tiles' loads are in
    flight while a tile is computed (Triton's own pipeliner keeps one copy in flight for this gather, issued
    after the tile before it is used). The first tiles' entries are bounded by the table's width, not by
    the sequence's length, so they do not wait for it (entries past the sequence go unused: K/V are masked
    by position)."""
    pos = start + offs_n
    blk = tl.load(bt_row + pos // PAGE, mask=pos // PAGE < bt_cols, other=0).to(tl.int64)
    blk_nx = tl.load(bt_row + (pos + BLOCK_N) // PAGE, mask=(pos + BLOCK_N) // PAGE < bt_cols, other=0)
    k_a, v_a = load_kv_tile(k_head, v_head, blk, pos, end, mask_c, stride_kb, stride_kt, stride_vb, stride_vt, PAGE)
    if PREFETCH == 2:
        pos2 = pos + 2 * BLOCK_N
        blk_nx2 = tl.load(bt_row + pos2 // PAGE, mask=pos2 // PAGE < bt_cols, other=0)
        k_b, v_b = load_kv_tile(k_head, v_head, blk_nx.to(tl.int64), pos + BLOCK_N, end, mask_c, stride_kb,
                                stride_kt, stride_vb, stride_vt, PAGE)
        blk_nx = blk_nx2
    for n0 in range(start, end, BLOCK_N):
        k_raw = k_a
        v_raw = v_a
        pos_nx = n0 + PREFETCH * BLOCK_N + offs_n
        if PREFETCH == 2:
            k_a = k_b
            v_a = v_b
            k_b, v_b = load_kv_tile(k_head, v_head, blk_nx.to(tl.int64), pos_nx, end, mask_c, stride_kb, stride_kt,
                                    stride_vb, stride_vt, PAGE)
        else:
            k_a, v_a = load_kv_tile(k_head, v_head, blk_nx.to(tl.int64), pos_nx, end, mask_c, stride_kb, stride_kt,
                                    stride_vb, stride_vt, PAGE)
        pos_bt = pos_nx + BLOCK_N
        blk_nx = tl.load(bt_row + pos_bt // PAGE, mask=pos_bt < end, other=0)
        m_i, l_i, acc = decode_tile(qc, to_dot(k_raw, DOT, KV_WORDS, CVT_ASM), to_dot(v_raw, DOT, KV_WORDS, CVT_ASM),
                                    n0 + offs_n < end, m_i, l_i, acc, qk_scale_cache, DOT, DOT_PREC)
    return m_i, l_i, acc
