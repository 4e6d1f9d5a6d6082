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
