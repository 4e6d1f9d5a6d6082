"""Varlen causal flash attention over a paged cache with a cached prefix (prefill / chunked prefill)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.triton_attention.common import LOG2E, dot_config, interpreting

# --------------------------------------------------------------------------------------------
# prefill: varlen causal flash attention over a paged cache


@triton.jit
def _prefill_tile(
    acc,
    m_i,
    l_i,
    q,
    qpos,
    k_head,
    v_head,
    bt_row,
    n0,
    hi,
    qk_scale,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    mask_d,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Fold keys [n0, n0 + BLOCK_N) into the online softmax; MASKED applies causality and hi."""
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_n = pos < hi
        blk = tl.load(bt_row + pos // PAGE, mask=mask_n, other=0).to(tl.int64)
        mask_kv = mask_n[:, None] & mask_d[None, :]
    else:
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
        mask_kv = mask_d[None, :]
    row = pos % PAGE
    k = tl.load(k_head + (blk * stride_kb + row * stride_kt)[:, None], mask=mask_kv, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    elif KV_FP8:
        k = k.to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        qk = tl.where((pos[None, :] <= qpos[:, None]) & mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_head + (blk * stride_vb + row * stride_vt)[:, None], mask=mask_kv, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    elif KV_FP8:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_btb"])  # the block table's width changes every step
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    bt_ptr,
    qsl_ptr,
    seq_lens_ptr,
    qk_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_btb,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr = False,
):
    """Program (tile, kv head, b). The tile's BLOCK_M rows are (query, head-of-group) pairs,
    row r = query r // G, head r % G, so the G heads sharing a KV head share every K/V tile."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (most causal work) tiles first
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // G
    heads = hk * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = qi < q_len
    tok = (q_start + qi).to(tl.int64)
    mask_q = mask_m[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_q,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    elif not KV_FP8:
        q = q.to(k_ptr.dtype.element_ty)
    qpos = ctx + qi

    # keys [0, lo) are visible to every row of the tile; [lo, hi) need the causal mask
    first_q = (tile * BLOCK_M) // G
    last_q = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // G, q_len - 1)
    hi = tl.where(first_q < q_len, ctx + last_q + 1, 0)
    lo = tl.minimum(((ctx + first_q) // BLOCK_N) * BLOCK_N, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_head = k_ptr + hk * stride_kh + offs_d[None, :] * stride_kd
    v_head = v_ptr + hk * stride_vh + offs_d[None, :] * stride_vd
    for n0 in range(0, lo, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(
            acc, m_i, l_i, q, qpos, k_head, v_head, bt_row, n0, hi, qk_scale,
            stride_kb, stride_kt, stride_vb, stride_vt, mask_d,
            PAGE, BLOCK_N, False, UPCAST, DOT_PREC, KV_FP8,
        )  # fmt: skip
    for n0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(
            acc, m_i, l_i, q, qpos, k_head, v_head, bt_row, n0, hi, qk_scale,
            stride_kb, stride_kt, stride_vb, stride_vt, mask_d,
            PAGE, BLOCK_N, True, UPCAST, DOT_PREC, KV_FP8,
        )  # fmt: skip

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * v_scale
    tl.store(
        o_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
        o.to(o_ptr.dtype.element_ty),
        mask=mask_q,
    )


def _prefill_config(block_d: int, elem_size: int, interpreting: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by head size and cache dtype.

    Checked by compiling for sm_90a: the 16-bit configs use wgmma and do not spill (D 64: 125,
    D 128: 190, D 256: 186 registers/thread). fp32 caches use IEEE fp32 FMA dots (exact
    parity with the fp32 reference; a debugging mode, not a fast path) on small tiles that fit
    the register file.
    """
    if interpreting:
        return 32, 32, 4, 1
    if elem_size >= 4:
        return 16, 16, 4, 1
    if block_d <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Varlen causal attention of flat queries q [T, Hq, D] over the paged cache -> [T, Hq, D].

    Grid (cdiv(max_query_len * G, BLOCK_M), Hkv, B), no host sync: programs past their
    sequence's q_len do no work. Each program owns BLOCK_M (query, head) rows of one GQA group,
    streams K/V tiles of BLOCK_N tokens through the block table with an fp32 online softmax:
    first the tiles wholly below the tile's first query position (no mask), then the causal
    diagonal tiles. The new tokens' K/V must already be in the cache (reshape_and_cache).
    ``max_query_len`` must be >= every q_len; ``max_seq_len`` is accepted for API symmetry.
    ``block_m``/``block_n`` override the heuristics (tests, tuning). A float8_e4m3fn cache is read
    as its values times ``k_scale`` / ``v_scale`` (tiles converted to q's dtype; k_scale folded into
    the softmax scale, v_scale applied to the output).
    """
    T, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    B = seq_lens.shape[0]
    G = Hq // Hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or B == 0 or max_query_len <= 0:
        return out
    block_d = triton.next_power_of_2(D)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    dot_dtype = q.dtype if fp8 else k_cache.dtype  # an FP8 cache is converted to q's dtype for the dots
    esize = torch.tensor([], dtype=dot_dtype).element_size()
    bm, bn, warps, stages = _prefill_config(block_d, esize, interpreting(q))
    bm = block_m or bm
    bn = block_n or bn
    upcast, prec = dot_config(q, dot_dtype)
    grid = (triton.cdiv(int(max_query_len) * G, bm), Hkv, B)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * LOG2E * (float(k_scale) if fp8 else 1.0), float(v_scale),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), block_tables.stride(0),
        G=G, HEAD_DIM=D, BLOCK_D=block_d, PAGE=page, BLOCK_M=bm, BLOCK_N=bn,
        UPCAST=upcast, DOT_PREC=prec, KV_FP8=fp8, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
